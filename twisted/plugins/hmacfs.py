from twisted.application.service import ServiceMaker

hmacfs = ServiceMaker(
    "hmacfs", "hmacd.tap", "HMAC-authenticated XMPP HTTP upload file server", "hmacfs"
)
