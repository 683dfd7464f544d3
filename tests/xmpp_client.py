"""
A real XMPP client for the interop tests: slixmpp and its XEP-0363 plugin, in its own process.

slixmpp runs on asyncio and the tests on Twisted, so the tests start this script with the path
of a plan in JSON and read one JSON document from stdout.  The plan names the account, the
address of the XMPP server and a list of steps:

- ``{"op": "disco", "service": JID}``: the service's disco#info (identities, features, and the
  upload form's ``max-file-size``).
- ``{"op": "slot", "service": JID, "filename": ..., "size": N, "content_type": ...}``: the slot
  as the service gave it (GET URL, PUT URL, PUT headers), or the error it answered with.
- ``{"op": "upload", "service": JID, "path": FILE, "filename": ..., "content_type": ...}``:
  ``upload_file`` exactly as a slixmpp application calls it (slot request, then the PUT with the
  slot's headers through aiohttp); the result is the GET URL it returns, or the error.

Each step's result is a JSON object in the output list, in plan order; a step that fails gives
``{"error": ...}`` and the next step still runs.
"""

import asyncio
import json
import logging
import sys

from slixmpp import JID, ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0363.http_upload import HTTPError

UPLOAD_NS = "urn:xmpp:http:upload:0"
TIMEOUT = 20


def _stanza_error(iq) -> dict:
    error = iq["error"]
    result = {
        "error": error["condition"],
        "type": error["type"],
        "text": error["text"],
    }
    too_large = error.xml.find(f"{{{UPLOAD_NS}}}file-too-large")
    if too_large is not None:
        result["file-too-large"] = {child.tag.partition("}")[2]: child.text for child in too_large}
    return result


def _disco(iq) -> dict:
    info = iq["disco_info"]
    forms = {}
    for form in info.iterables:
        values = form["values"]
        forms[values["FORM_TYPE"][0] if values.get("FORM_TYPE") else ""] = {
            name: value for name, value in values.items() if name != "FORM_TYPE"
        }
    return {
        "from": str(iq["from"]),
        # slixmpp gives (category, type, lang, name)
        "identities": [[i[0], i[1], i[3]] for i in info["identities"]],
        "features": sorted(info["features"]),
        "forms": forms,
    }


async def _step(xmpp: ClientXMPP, step: dict) -> dict:
    upload = xmpp.plugin["xep_0363"]
    op = step["op"]
    if op == "disco":
        return _disco(await xmpp.plugin["xep_0030"].get_info(JID(step["service"]), timeout=TIMEOUT))
    if op == "slot":
        iq = await upload.request_slot(
            JID(step["service"]),
            step["filename"],
            step["size"],
            step.get("content_type"),
            timeout=TIMEOUT,
        )
        slot = iq["http_upload_slot"]
        return {
            "get": slot["get"]["url"],
            "put": slot["put"]["url"],
            "headers": {h["name"]: h["value"] for h in slot["put"]["headers"]},
        }
    if op == "upload":
        # upload_file discovers the service once per client; point it at the one under test
        # (with that service's advertised limit) so that each step exercises its own service.
        info = _disco(await xmpp.plugin["xep_0030"].get_info(JID(step["service"]), timeout=TIMEOUT))
        upload.upload_service = JID(step["service"])
        upload.max_file_size = int(info["forms"][UPLOAD_NS]["max-file-size"])
        with open(step["path"], "rb") as f:
            url = await upload.upload_file(
                step["filename"],
                content_type=step.get("content_type"),
                input_file=f,
                timeout=TIMEOUT,
            )
        return {"get": url}
    raise ValueError(f"unknown op {op!r}")


async def main(plan: dict) -> list[dict]:
    xmpp = ClientXMPP(plan["jid"], plan["password"])
    # A loopback test server without TLS: let SASL run in the clear.
    xmpp.enable_starttls = False
    xmpp.enable_direct_tls = False
    xmpp.enable_plaintext = True
    xmpp.register_plugin("xep_0030")
    xmpp.register_plugin("xep_0363")
    xmpp.plugin["feature_mechanisms"].unencrypted_plain = True
    xmpp.plugin["feature_mechanisms"].unencrypted_scram = True
    started = asyncio.get_running_loop().create_future()
    xmpp.add_event_handler("session_start", lambda _: started.done() or started.set_result(None))
    xmpp.add_event_handler(
        "failed_auth",
        lambda _: started.done() or started.set_exception(RuntimeError("authentication failed")),
    )
    xmpp.connect(plan["host"], plan["port"])
    await asyncio.wait_for(started, TIMEOUT)
    results = []
    for step in plan["steps"]:
        try:
            results.append(await _step(xmpp, step))
        except IqError as e:
            results.append(_stanza_error(e.iq))
        except IqTimeout:
            results.append({"error": "timeout"})
        except HTTPError as e:
            results.append({"error": "http", "status": e.args[0], "body": e.args[1]})
        except Exception as e:
            results.append({"error": "exception", "text": f"{type(e).__name__}: {e}"})
    await xmpp.disconnect()
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    json.dump(asyncio.run(main(plan)), sys.stdout)
