"""``http://`` / ``https://`` remotes for mosaicml-streaming (it ships s3/gs/oci/azure/hf/sftp only).

Shards published behind a plain web server, a CDN or pre-signed object-store URLs are
then read like any other remote: downloaded once per node into the local cache and
verified against the index's hashes. :func:`register_http_remote` is idempotent and is
called when :mod:`ssa_megatron.data.loader` is imported.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request

from streaming.base.storage import download as _download


class HTTPDownloader(_download.CloudDownloader):
    """Fetch one file over HTTP(S) into a temporary name, then rename (readers never see partial files)."""

    @staticmethod
    def _client_identifier() -> str:
        return "http"

    def _validate_remote_path(self, remote: str) -> None:
        if not remote.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// remote, got {remote!r}")

    def clean_up(self) -> None:
        """Nothing to release: each download opens and closes its own connection."""

    def _download_file_impl(self, remote: str, local: str, timeout: float) -> None:
        tmp = f"{local}.tmp.{os.getpid()}"
        try:
            with urllib.request.urlopen(remote, timeout=timeout) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
        except urllib.error.HTTPError as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            if err.code == 404:
                raise FileNotFoundError(f"{remote} does not exist on the server (HTTP 404)") from err
            raise
        os.replace(tmp, local)


def register_http_remote() -> None:
    for scheme in ("http", "https"):
        _download.DOWNLOADER_MAPPINGS.setdefault(scheme, HTTPDownloader)
