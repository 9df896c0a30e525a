"""The CLI's HTTP client; answers that are errors become errors in :mod:`keysteward.api_errors`."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from keysteward.api_errors import answer_error, transport_error
from keysteward.cli.data_dir import server_defaults
from keysteward.kms_failover import Failover, split_urls


@dataclass(frozen=True)
class ClientOptions:
    url: str
    token: str | None
    ca_file: str | None
    cert: str | None
    key: str | None
    timeout: float = 30.0

    @classmethod
    def resolve(
        cls,
        url: str | None,
        token: str | None,
        ca_file: str | None,
        cert: str | None,
        key: str | None,
        data_dir: str | None,
    ) -> ClientOptions:
        """Options given on the command line win; then the server's data directory fills gaps."""
        if data_dir and (not url or not ca_file):
            found_url, found_ca = server_defaults(data_dir)
            url, ca_file = url or found_url, ca_file or found_ca
        return cls(url=url or "https://127.0.0.1:8443", token=token, ca_file=ca_file, cert=cert, key=key)


class Client:
    """The server at ``options.url``, or each of a comma list of URLs in turn (:mod:`keysteward.kms_failover`):
    reads move on after a 503 or a lost answer, changes only when they never reached a server."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        verify = ssl.create_default_context(cafile=options.ca_file)
        if options.cert and options.key:
            verify.load_cert_chain(options.cert, options.key)
        headers = {"authorization": f"Bearer {options.token}"} if options.token else {}
        urls = split_urls(options.url)
        self._https = {
            url: httpx.Client(base_url=url + "/v1", verify=verify, headers=headers, timeout=options.timeout)
            for url in urls
        }
        self.failover = Failover(urls)

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return self.failover.run(lambda url: self._request(url, method, path, json, params), safe=method == "GET")

    def _request(self, url: str, method: str, path: str, json: Any, params: dict[str, Any] | None) -> Any:
        try:
            response = self._https[url].request(method, path, json=json, params=params)
        except httpx.HTTPError as exc:
            raise transport_error(exc, url, "server_unreachable") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            error = answer_error(response.status_code, body, response.reason_phrase, url)
            assert error is not None
            raise error
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json={} if json is None else json, **kw)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def env(name: str) -> str | None:
    return os.environ.get(name) or None
