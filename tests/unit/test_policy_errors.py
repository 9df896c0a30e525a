"""Policy errors an operator can act on: placed at file:line:column, the first real mistake first."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from keysteward.errors import BadRequest
from keysteward.policy.engine import MAX_POLICIES, MAX_SET_BYTES, CompiledPolicySet, PolicyDecision
from keysteward.policy.errors import PolicyInvalid, PolicyTooLarge
from tests.unit.test_policy_engine import request

pytestmark = pytest.mark.unit

RELEASE = 'action == Keysteward::Action::"release"'
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def compile_error(sources: dict[str, str]) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as caught:
        CompiledPolicySet.compile(sources)
    assert caught.value.code == "policy_invalid" and caught.value.status == 400
    assert isinstance(caught.value, BadRequest)
    return caught.value


# -- compile: errors at file:line:column ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        pytest.param(
            "permit(principal, action, resource)\nwhen { context.x == };", "2:21", "unexpected token `}`", id="token"
        ),
        pytest.param(
            'permit(principal, action, resource) when { "abc };', "1:44", "invalid token", id="unterminated-string"
        ),
        pytest.param("permit(principal, action, resource) when { 1 $ 2 };", "1:46", "invalid token", id="bad-char"),
        pytest.param("permit(principal, action, resource)", "1:36", "unexpected end of input", id="no-semicolon"),
        pytest.param(
            "// c\n\npermit(principal, action, resource) when { foo(1) };", "3:44", "`foo` is not a valid", id="fn"
        ),
        pytest.param(
            "permit(?principal, action, resource);", "1:8", "unexpected token `?principal`", id="slot-in-scope"
        ),
        pytest.param("permit(principal == ?principal, action, resource);", "1:1", "templates", id="template"),
        pytest.param(
            "permit(principal, action, resource) when {\n  context.request.hour > 8 &&\n"
            '  context.request.hour == "x"\n};',
            "3:3",
            "not compatible",
            id="type-mismatch-line",
        ),
        pytest.param(
            f'permit(principal is Keysteward::Instance, {RELEASE}, resource)\nwhen {{ principal.acount == "1" }};',
            "2:18",
            "attribute `acount`",
            id="attribute-typo",
        ),
        pytest.param(
            f"permit(principal, {RELEASE}, resource) when {{\n  true &&\n  context.platform.debug == false }};",
            "3:3",
            "optional attribute",
            id="optional-without-has",
        ),
        pytest.param(
            'permit(principal, action == Keysteward::Action::"relase", resource);', "1:1", "relase", id="unknown-action"
        ),
    ],
)
def test_bad_policy_is_placed_at_file_line_column(text: str, where: str, says: str) -> None:
    error = compile_error({"team/a.cedar": text})
    assert error.problems[0].startswith(f"team/a.cedar:{where}: "), error.problems
    assert says in error.problems[0]
    assert error.message.startswith(f"team/a.cedar:{where}: ")


def test_every_bad_file_and_policy_is_reported() -> None:
    error = compile_error(
        {
            "a.cedar": "permit(principal, action, resource);\nforbid(principal, action, resource) when { x };",
            "b.cedar": "\n\npermit(principal, action, resource) when { 1 + };",
        }
    )
    assert [p.split(": ")[0] for p in error.problems] == ["a.cedar:2:44", "b.cedar:3:48"]
    assert error.message.endswith("(and 1 more)")
    assert error.diagnostics().count("policy_invalid: ") == 2


def test_schema_errors_name_the_policy_by_its_id() -> None:
    text = (
        f'permit(principal, {RELEASE}, resource);\n@id("tee")\n'
        f"permit(principal, {RELEASE}, resource) when {{ context.platform.tee == 1 }};"
    )
    error = compile_error({"p.cedar": text})
    assert error.problems[0].startswith("p.cedar:3:") and "not compatible" in error.problems[0]


@pytest.mark.parametrize(
    ("annotations", "says"),
    [
        ('@approval_group("security-officer") @approval_quorum("two")', "@approval_quorum needs"),
        ('@approval_group("security-officer") @approval_quorum("0")', "@approval_quorum needs"),
        ('@approval_group("security-officer") @approval_quorum("33")', "@approval_quorum needs"),
        ('@approval_group("security-officer")', "@approval_quorum needs"),
        ('@approval_quorum("2")', "@approval_group needs"),
        ('@approval_group("security officer") @approval_quorum("2")', "@approval_group needs"),
        ('@approval_group("so") @approval_quorum("2") @approval_valid_for("-1")', "@approval_valid_for needs"),
        ('@approval_group("so") @approval_quorum("2") @approval_valid_for("9999999")', "@approval_valid_for needs"),
        ('@approval_qourum("2")', "unknown annotation @approval_qourum"),
        ('@id("")', "@id needs"),
    ],
)
def test_bad_annotations_are_refused(annotations: str, says: str) -> None:
    error = compile_error({"p.cedar": f"// header\n{annotations}\npermit(principal, action, resource);"})
    assert error.problems[0].startswith("p.cedar:2:") and says in error.problems[0]


def test_approval_on_a_forbid_is_refused() -> None:
    text = '@approval_group("so") @approval_quorum("2")\nforbid(principal, action, resource);'
    assert "belong on a permit" in compile_error({"p.cedar": text}).message


def test_duplicate_ids_are_refused_across_files() -> None:
    error = compile_error(
        {
            "a.cedar": '@id("x") permit(principal, action, resource);',
            "b.cedar": '@id("x") forbid(principal, action, resource);',
        }
    )
    assert error.problems == ("b.cedar:1:1: duplicate policy id 'x'",)


def test_sizes_are_capped() -> None:
    policy = "permit(principal, action, resource);\n"
    with pytest.raises(PolicyTooLarge) as caught:
        CompiledPolicySet.compile({"a.cedar": policy * (MAX_POLICIES + 1)})
    assert caught.value.status == 413 and caught.value.code == "policy_too_large"
    with pytest.raises(PolicyTooLarge):
        CompiledPolicySet.compile({"a.cedar": "//" + "x" * MAX_SET_BYTES})
    with pytest.raises(PolicyTooLarge):
        CompiledPolicySet.compile({f"f{n}.cedar": "" for n in range(101)})
    assert len(CompiledPolicySet.compile({"a.cedar": policy * MAX_POLICIES}).ids) == MAX_POLICIES


@pytest.mark.parametrize(
    "sources",
    [[], {"../x.cedar": ""}, {"": ""}, {"a b.cedar": ""}, {"a.cedar": b"permit"}, {1: ""}, {"a.cedar": "// \ud800"}],
)
def test_malformed_sets_are_refused(sources: Any) -> None:
    with pytest.raises(PolicyInvalid):
        CompiledPolicySet.compile(sources)


def test_empty_sets_compile_and_deny_everything() -> None:
    for sources in ({}, {"a.cedar": ""}, {"a.cedar": "// nothing yet\n"}):
        policies = CompiledPolicySet.compile(sources)
        assert policies.ids == ()
        assert policies.evaluate(request()) == PolicyDecision("deny", (), None, (), "no_permit")


def test_ids_and_sources() -> None:
    text = (
        'permit(principal, action, resource);\n@id("named") forbid(principal, action, resource) when { false };\n'
        "permit(principal, action, resource);"
    )
    policies = CompiledPolicySet.compile({"t.cedar": text})
    assert policies.ids == ("t.cedar#1", "named", "t.cedar#3")
    assert policies.sources == {"t.cedar": text}


def test_a_typo_is_the_first_problem_not_what_it_brings_with_it() -> None:
    """A typo in ``principal.acount`` makes Cedar also doubt the ``has``-guarded ``image_id`` after it and list
    that first: the operator is shown the typo, at its line, with the attribute it was meant to be."""
    text = (
        f"permit(principal is Keysteward::Instance, {RELEASE}, resource)\n"
        'when { principal.acount == "1" &&\n'
        '  principal has image_id && principal.image_id == "img" };'
    )
    error = compile_error({"p.cedar": text})
    assert error.problems == (
        "p.cedar:2:18: for policy `p.cedar#1`, unknown attribute `acount` of the principal type "
        "`Keysteward::Instance`; did you mean `account`? "
        "(attributes: account, image_id, instance_id, provider, region, tenant, zone)",
    )
    assert "more)" not in error.message


def test_an_unknown_attribute_of_several_principal_types_is_one_problem() -> None:
    error = compile_error({"p.cedar": f'permit(principal, {RELEASE}, resource)\nwhen {{ principal.acount == "1" }};'})
    assert len(error.problems) == 1
    assert "`acount` of the principal type `Keysteward::Host` or `Keysteward::Instance`" in error.problems[0]


def test_problems_come_in_the_order_of_the_text() -> None:
    text = (
        f'permit(principal is Keysteward::Instance, {RELEASE}, resource) when {{ principal.zzz == "1" }};\n'
        f'permit(principal is Keysteward::Instance, {RELEASE}, resource) when {{ resource.bindin == "1" }};'
    )
    error = compile_error({"p.cedar": text})
    assert [p.split(":")[:2] for p in error.problems] == [["p.cedar", "1"], ["p.cedar", "2"]]
    assert (
        "unknown attribute `bindin` of the resource type `Keysteward::Volume`; did you mean `binding`?"
        in (error.problems[1])
    )


def test_a_context_attribute_of_some_actions_is_one_problem() -> None:
    """A policy for every action reading ``context.identity``: one problem naming the actions, not 20."""
    error = compile_error({"p.cedar": 'forbid(principal, action, resource) when { context.identity.provider == "x" };'})
    assert len(error.problems) == 1, error.problems
    assert "unknown attribute `identity` of the context of actions " in error.problems[0]
    assert "more)" not in error.message
