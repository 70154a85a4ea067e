"""HTTP with retries, and resumable, verified file downloads (stdlib ``urllib`` only).

:func:`download` writes into ``<dest>.part`` and renames it to ``dest`` only once the byte
count announced by the server (``Content-Length`` / ``Content-Range`` total) has arrived and
the md5 (when given) matches, so a file at ``dest`` is always complete. An interrupted
download resumes from the ``.part`` file with ``Range: bytes=N-`` (a server that answers 200
instead of 206 is read again from the start). Connection errors, resets, truncated bodies,
HTTP 5xx and 429 are retried with exponential backoff (``Retry-After`` honoured); other 4xx
answers fail at once with the URL in the message.

:func:`request_bytes` is the small sibling for API calls (e.g. Overpass): one request with
the same retry policy, the whole body returned.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

# HTTP statuses worth retrying: rate limiting and server-side/gateway failures.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Network failures worth retrying (URLError covers refused connections and DNS errors).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)")

# Indirection so tests can record the waits instead of sleeping.
_sleep = time.sleep


class DownloadError(RuntimeError):
    """A download or HTTP request failed for good (after retries, or at once for a 4xx)."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the expected md5 (the bad file has been removed)."""


class _Retryable(Exception):
    """Internal: this attempt failed in a way worth retrying; ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header.

    Args:
        value: the header value: delta-seconds or an HTTP date; None or "" if absent.

    Returns:
        Seconds (>= 0), or None when absent or unparseable (logged).
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        logger.warning("ignoring unparseable Retry-After header %r", value)
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, backoff_s: float, retry_after: float | None) -> float:
    """Wait before retry number ``attempt``.

    Args:
        attempt: 1 for the first retry.
        backoff_s: the first wait.
        retry_after: the server's Retry-After in seconds, which wins when given.

    Returns:
        ``retry_after`` if given, else ``backoff_s * 2 ** (attempt - 1)``.
    """
    if retry_after is not None:
        return retry_after
    return backoff_s * 2 ** (attempt - 1)


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks.

    Args:
        path: the file.
        chunk: read size in bytes.

    Returns:
        32 lowercase hex digits.
    """
    digest = hashlib.md5()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _http_error(err: urllib.error.HTTPError, url: str, hint: str) -> Exception:
    """Turn an HTTPError into a retryable marker or a final DownloadError."""
    if err.code in RETRY_STATUSES:
        return _Retryable(f"HTTP {err.code} from {url}", parse_retry_after(err.headers.get("Retry-After")))
    if err.code == 404:
        return DownloadError(
            f"{url}: not found (HTTP 404); the file moved or the URL is wrong. {hint}".strip()
        )
    return DownloadError(f"{url}: HTTP {err.code} {err.reason}. {hint}".strip())


def request_bytes(
    request: urllib.request.Request | str,
    *,
    retries: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> bytes:
    """Send one HTTP request and return the whole body, retrying transient failures.

    Args:
        request: a URL or a prepared ``urllib.request.Request`` (e.g. a POST).
        retries: how many times to retry after the first attempt.
        backoff_s: first backoff wait; doubled each retry unless the server sends Retry-After.
        timeout_s: socket timeout per attempt.

    Returns:
        The response body.

    Raises:
        DownloadError: on a non-retryable HTTP error (4xx other than 429), or when all
            retries are spent; the message names the URL.
    """
    url = request.full_url if isinstance(request, urllib.request.Request) else request
    last = ""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                body = resp.read()
            if length is not None and len(body) != int(length):
                raise _Retryable(f"truncated answer from {url}: {len(body)} of {length} bytes")
            return body
        except urllib.error.HTTPError as err:
            failure = _http_error(err, url, "")
            if isinstance(failure, DownloadError):
                detail = err.read()[:300].decode("utf-8", "replace").strip()
                raise DownloadError(f"{failure} Server said: {detail!r}" if detail else str(failure)) from err
            last, retry_after = str(failure), failure.retry_after
        except _Retryable as err:
            last, retry_after = str(err), err.retry_after
        except _NETWORK_ERRORS as err:
            last, retry_after = f"{type(err).__name__}: {err}", None
        if attempt < retries:
            wait = backoff_delay(attempt + 1, backoff_s, retry_after)
            logger.warning("%s; retry %d/%d in %.1f s", last, attempt + 1, retries, wait)
            _sleep(wait)
    raise DownloadError(f"{url}: giving up after {retries + 1} attempts; last error: {last}")


def _content_total(resp: http.client.HTTPResponse, offset: int) -> tuple[int, int | None]:
    """(start offset of the body, total file size or None) from a 200/206 response."""
    if resp.status == 206:
        match = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
        if match is None:
            header = resp.headers.get("Content-Range")
            raise _Retryable(f"206 answer without a usable Content-Range header: {header!r}")
        start = int(match.group(1))
        total = None if match.group(3) == "*" else int(match.group(3))
        if start != offset:
            raise _Retryable(f"server resumed at byte {start}, asked for {offset}")
        return start, total
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _attempt(url: str, part: Path, timeout_s: float, chunk: int, hint: str) -> int | None:
    """One request appending to ``part``; returns the expected total (None if unknown).

    Returns normally only when the body arrived up to its announced end.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            match = _UNSATISFIED_RANGE_RE.match(err.headers.get("Content-Range", ""))
            if match is not None and int(match.group(1)) == offset:
                logger.info("%s: already complete (%d bytes)", part, offset)
                return offset
            logger.warning("%s: server refused to resume at byte %d; starting over", part, offset)
            part.unlink()
            raise _Retryable("range not satisfiable", retry_after=0.0) from err
        raise _http_error(err, url, hint) from err
    with resp:
        start, total = _content_total(resp, offset)
        if start == 0 and offset:
            logger.info("%s: server ignored the Range request; downloading from the start", part)
        mode = "ab" if start else "wb"
        name = part.name[: -len(".part")]
        with part.open(mode) as fh, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc=name, leave=False
        ) as bar:
            while block := resp.read(chunk):
                fh.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")
    if total is None:
        logger.warning("%s: the server did not announce a size; cannot check completeness", url)
    return total


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    retries: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
    chunk: int = 1 << 20,
    hint: str = "",
) -> Path:
    """Download ``url`` to ``dest``, resumably, with retries and an optional md5 check.

    Bytes go to ``dest.part``; it is renamed to ``dest`` only when complete and verified,
    so an existing ``dest`` is never a partial file. An existing ``dest`` is reused (after
    an md5 check when ``md5`` is given; a mismatching one is downloaded again). Retries
    count consecutive attempts without progress, so a long download that keeps resuming
    is not cut short.

    Args:
        url: what to fetch.
        dest: final path; its parent is created.
        md5: expected hex md5 of the complete file, or None to skip the check.
        retries: retries after the first attempt (per stretch without progress).
        backoff_s: first wait between attempts, doubled each retry (Retry-After wins).
        timeout_s: socket timeout per attempt.
        chunk: read size in bytes.
        hint: extra advice appended to error messages (e.g. the manual download route).

    Returns:
        ``dest``.

    Raises:
        DownloadError: HTTP 404/other 4xx (naming the URL and ``hint``), or retries spent.
        ChecksumError: the complete file has the wrong md5; it has been deleted.
    """
    dest = Path(dest)
    if dest.exists():
        if md5 is None:
            logger.info("%s already present; not downloading", dest)
            return dest
        actual = file_md5(dest)
        if actual == md5.lower():
            logger.info("%s already present, md5 ok", dest)
            return dest
        logger.warning("%s exists but has md5 %s, expected %s; downloading it again", dest, actual, md5)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = attempts = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        attempts += 1
        try:
            _attempt(url, part, timeout_s, chunk, hint)
            break
        except _Retryable as err:
            message, retry_after = str(err), err.retry_after
        except _NETWORK_ERRORS as err:
            message, retry_after = f"{type(err).__name__}: {err}", None
        received = part.stat().st_size if part.exists() else 0
        failures = 1 if received > before else failures + 1
        if failures > retries:
            # Say what arrived: a failed attempt may still have brought most of the file.
            raise DownloadError(
                f"{url}: giving up after {attempts} attempt(s) ({retries} retries allowed after an attempt "
                f"that brings nothing); {received} bytes received so far; last error: {message}"
                + (f"; the partial file {part} is kept, rerun to resume" if received else "")
                + f". {hint}".rstrip()
            )
        wait = backoff_delay(failures, backoff_s, retry_after)
        logger.warning("%s: %s; retry %d/%d in %.1f s", dest.name, message, failures, retries, wait)
        _sleep(wait)
    if md5 is not None:
        actual = file_md5(part)
        if actual != md5.lower():
            part.unlink()
            raise ChecksumError(
                f"{dest}: md5 mismatch after download from {url}: expected {md5.lower()}, got {actual}; "
                "the bad file was deleted. Rerun to download it again; if it keeps failing the file on "
                f"the server changed: check the expected md5. {hint}".strip()
            )
    os.replace(part, dest)
    logger.info("downloaded %s (%d bytes)", dest, dest.stat().st_size)
    return dest
