"""
hmacfs: an HMAC-authenticated file server for XMPP HTTP File Upload.

Embedding it in a Twisted program that runs already:

    from hmacd import Config, make_service, sign_v2

    service = make_service(Config(ListenPort...), reactor)     # its own port
    service.setServiceParent(application)

or inside a Site of the host's own, under /upload/:

    service = make_service(config, reactor, listen=False)
    mount(site, root, service.fileServer)

C{sign_v}, C{sign_v2}, C{sign_token} and C{sign_jwt} issue slots exactly as
Prosody, ejabberd and Metronome do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from hmacd.auth import DEFAULT_CONTENT_TYPE, sign_jwt, sign_token, sign_v, sign_v2
from hmacd.config import Config, ConfigError, load_config
from hmacd.core import FileServer

if _TYPE_CHECKING:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from hmacd.services import HmacfsService

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "Config",
    "ConfigError",
    "FileServer",
    "load_config",
    "make_service",
    "mount",
    "sign_jwt",
    "sign_token",
    "sign_v",
    "sign_v2",
]


def make_service(
    config: Config, reactor: _Any, secret: bytes | None = None, listen: bool = True
) -> HmacfsService:
    """
    The hmacfs services for C{config} as one C{IService} (a MultiService) to
    add to the host's own.  The secret is C{secret}, else C{config.secret},
    else the generated one under C{StoreDir/.hmacfs/secret}.  The service's
    C{fileServer} attribute is the L{FileServer}, for L{mount}.

    StoreDir and the secret are prepared as twistd prepares them
    (L{hmacd.prepare.prepare_store}); HMACFS_SECRET is not read.
    """
    from hmacd.prepare import prepare_store
    from hmacd.tap import build_prepared

    # The environment is the host program's: HMACFS_SECRET is not read.
    prepared = prepare_store(
        config,
        secret=secret,
        origin="the embedding program",
        environ={},
        shared_metrics=listen and config.workers > 1,
    )
    return build_prepared(prepared, reactor, listen=listen)


def mount(site: Site, root: Resource, fileServer: FileServer) -> None:
    """
    Serve C{fileServer}'s upload space at C{/<UploadSubDir>/} of the host's
    C{site}, whose root resource is C{root}.

    What the host Site gets: L{hmacd.upload.UploadRequest} as its request
    factory (uploads are judged and streamed before any resource is looked
    up; every other request is an ordinary twisted.web request, which now
    also carries the CORS and nosniff headers) and a C{fileServer}
    attribute.  UploadSubDir must be one non-empty path segment.

    The Site's access-log formatter is wrapped so that no MAC or bearer token
    reaches the log and every line is one printable line
    (L{hmacd.web.censor_access_log}); a Site whose class overrides C{log()}
    is refused with L{ValueError}.
    """
    from hmacd.web import install_policy

    install_policy(site, root, fileServer)
