"""An `image_url` from a request -> an RGB PIL image, within the server's limits.

Sources: `data:image/png|jpeg;base64,...` always; `file://` only under `--allow-files DIR`; `http(s)://`
only with `--allow-remote-images`, and then only to public addresses, size-capped, time-limited and with
every redirect hop checked again. A refused source is refused before anything is read or fetched.

Every image is decoded by `decode_image`, the one place the pixel and aspect limits apply: Pillow's
Image.open reads only the header, so a decompression bomb (a few KB that decode to gigapixels) or a
100000x1 strip is refused from its declared size before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from ..errors import RuntimeInputError, one_line
from ..image_input import load_image
from .errors import APIError
from .options import ServeOptions

DATA_URL = re.compile(r"data:image/(png|jpeg|jpg);base64,(.*)", re.S | re.I)
FORMATS = ("PNG", "JPEG")
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3


def decode_image(data: bytes, max_pixels: int, max_aspect: float, name: str = "the image"):
    """Encoded PNG/JPEG bytes -> RGB PIL image, decoded by the runtime's `load_image` (EXIF orientation
    applied, alpha dropped), or APIError(400) naming the problem. The server's limits are checked on the
    header first; the runtime's own (MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO) apply inside load_image."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise APIError(400, f"{name} is not a PNG or JPEG image", code="invalid_image") from None
    except Image.DecompressionBombError as exc:  # Pillow's own header check, at twice its MAX_IMAGE_PIXELS
        raise APIError(400, f"{name} is over the limit of {max_pixels:,} pixels (--max-image-pixels): {exc}",
                       code="image_too_large") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds (and its own bomb error)
        raise APIError(400, f"cannot read {name}: {one_line(exc)}", code="invalid_image") from None
    if image.format not in FORMATS:
        raise APIError(400, f"{name} is {image.format}; send PNG or JPEG", code="invalid_image")
    width, height = image.size
    if width < 1 or height < 1:
        raise APIError(400, f"{name} is empty ({width}x{height})", code="invalid_image")
    if width * height > max_pixels:
        raise APIError(400, f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of "
                            f"{max_pixels:,} (--max-image-pixels)", code="image_too_large")
    if max(width, height) / min(width, height) > max_aspect:
        raise APIError(400, f"{name} is {width}x{height}, longer than {max_aspect:g}:1 (--max-image-aspect)",
                       code="image_too_large")
    # The server's own (configurable) limits passed on the header; the runtime's one loader decodes it, so a
    # served image becomes exactly what `Pipeline.chat` would make of the same file (16-bit scaling included).
    try:
        return load_image(data)
    except RuntimeInputError as exc:
        raise APIError(400, f"{name}: {exc}", code="invalid_image") from None


async def load_image_url(url: str, options: ServeOptions):
    """The image an image_url part names, decoded within the limits (see the module docstring)."""
    data = await image_bytes(url, options)
    return decode_image(data, options.max_image_pixels, options.max_image_aspect)


async def image_bytes(url: str, options: ServeOptions) -> bytes:
    if not isinstance(url, str) or not url:
        raise APIError(400, "image_url.url must be a non-empty string", code="invalid_image_url")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return data_url_bytes(url)
    if scheme == "file":
        if options.allow_files is None:
            raise APIError(400, "file:// image URLs are off; start the server with --allow-files DIR to allow "
                                "files under DIR", code="image_source_not_allowed")
        return file_bytes(url, Path(options.allow_files), options.max_body_bytes)
    if scheme in ("http", "https"):
        if not options.allow_remote_images:
            raise APIError(400, f"{scheme}:// image URLs are off; send a data: URL, or start the server with "
                                "--allow-remote-images", code="image_source_not_allowed")
        return await fetch_remote(url, options.remote_max_bytes, options.remote_timeout_s)
    raise APIError(400, "image_url.url must be a data:image/png or data:image/jpeg base64 URL", code="invalid_image_url")


def data_url_bytes(url: str) -> bytes:
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise APIError(400, f"image_url.url {url[:40]!r}... is not a data:image/png or data:image/jpeg base64 URL",
                       code="invalid_image_url")
    try:
        return base64.b64decode("".join(match.group(2).split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url.url holds invalid base64", code="invalid_image_url") from None


def file_bytes(url: str, root: Path, max_bytes: int) -> bytes:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise APIError(400, f"file URL names host {parts.netloc!r}; only local files are read", code="invalid_image_url")
    try:
        path = Path(unquote(parts.path)).resolve(strict=True)
    except (OSError, RuntimeError):
        raise APIError(400, f"no such image file under the allowed folder: {unquote(parts.path)}",
                       code="invalid_image_url") from None
    if not path.is_relative_to(root.resolve()) or not path.is_file():  # symlinks resolved first
        raise APIError(400, f"{unquote(parts.path)} is not a file under the allowed folder (--allow-files)",
                       code="image_source_not_allowed")
    if path.stat().st_size > max_bytes:
        raise APIError(400, f"{path.name} is over {max_bytes:,} bytes", code="image_too_large")
    return path.read_bytes()


def is_public_address(ip: str) -> bool:
    """Whether fetching from `ip` is allowed: globally routable only (no loopback, private, link-local,
    shared, reserved or multicast ranges, IPv4-mapped IPv6 included)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def fetch_remote(url: str, max_bytes: int, timeout: float,
                       address_allowed: Callable[[str], bool] = is_public_address) -> bytes:
    """GET an image over http(s): each hop's host is resolved, every address checked with
    `address_allowed`, and the connection made to that checked address (the Host header and TLS name
    stay the URL's), so a DNS answer cannot change between check and connect. At most MAX_REDIRECTS
    redirects, `max_bytes` of body, `timeout` seconds in all."""
    try:
        return await asyncio.wait_for(_fetch(url, max_bytes, timeout, address_allowed), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        raise APIError(400, f"fetching the image timed out after {timeout:g} s", code="image_fetch_failed") from None


async def _fetch(url: str, max_bytes: int, timeout: float, address_allowed) -> bytes:
    import httpx

    async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise APIError(400, f"cannot fetch {url[:80]!r}: only http(s) URLs with a host", code="invalid_image_url")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await _checked_address(parts.hostname, port, address_allowed)
            host = f"[{address}]" if ":" in address else address
            pinned = parts._replace(netloc=f"{host}:{port}").geturl()
            extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/png, image/jpeg"}
            try:
                async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                    if response.status_code in REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise APIError(400, f"fetching the image failed: HTTP {response.status_code}",
                                       code="image_fetch_failed")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise APIError(400, f"the image at the URL is {int(declared):,} bytes, over {max_bytes:,}",
                                       code="image_too_large")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise APIError(400, f"the image at the URL is over {max_bytes:,} bytes",
                                           code="image_too_large")
                    return bytes(body)
            except httpx.HTTPError as exc:
                raise APIError(400, f"fetching the image failed: {one_line(exc) or type(exc).__name__}",
                               code="image_fetch_failed") from None
        raise APIError(400, f"the image URL redirected more than {MAX_REDIRECTS} times", code="image_fetch_failed")


async def _checked_address(host: str, port: int, address_allowed) -> str:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise APIError(400, f"cannot resolve the image host {host!r}", code="image_fetch_failed") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    refused = [a for a in addresses if not address_allowed(a)]
    if refused or not addresses:
        raise APIError(400, f"the image host {host!r} resolves to a non-public address ({refused[0] if refused else 'none'}); "
                            "refused", code="image_source_not_allowed")
    return addresses[0]
