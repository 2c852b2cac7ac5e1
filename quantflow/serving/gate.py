"""The deploy stage's own check of the validation verdict, independent of the flow's branch.

A model reaches a server only if its validation report exists, is byte-for-byte the
report the validate stage wrote, says overall_pass, and names the sha256 of exactly the
checkpoint about to be served.
"""

from __future__ import annotations

import hashlib
import json

from quantflow.errors import StageError
from quantflow.storage.manifests import QuantizedManifest, ValidationManifest
from quantflow.storage.hashing import CARD_FILE
from quantflow.storage.store import read_uri

STAGE = "deploy"


def verify_release(quantized: QuantizedManifest, validation: ValidationManifest | None,
                   served_sha256: str) -> dict:
    """`served_sha256`: digest of the files about to be served, as fetch_quantized verified
    them on disk (hashed once, not again here)."""
    if validation is None:
        raise StageError(STAGE, "no validation report: refusing to deploy an unvalidated model",
                         "run the validate stage first")
    try:
        raw = read_uri(validation.report_uri)
    except FileNotFoundError:
        raise StageError(STAGE, f"validation report {validation.report_uri} is missing: "
                         "refusing to deploy", "re-run the pipeline to re-validate") from None
    if hashlib.sha256(raw).hexdigest() != validation.report_sha256:
        raise StageError(STAGE, f"validation report {validation.report_uri} was modified after the "
                         "validate stage wrote it: refusing to deploy",
                         "re-run the pipeline to re-validate (delete the report to force it)")
    report = json.loads(raw)
    if not report.get("overall_pass"):
        raise StageError(STAGE, f"validation report says the model failed ({report.get('summary')}): "
                         "refusing to deploy")
    served = served_sha256
    if not (report.get("checkpoint_sha256") == validation.checkpoint_sha256 == served
            == quantized.checkpoint_sha256):
        raise StageError(STAGE, "the validation report is for a different checkpoint than the one "
                         f"being deployed (report {report.get('checkpoint_sha256', '?')[:12]}, "
                         f"checkpoint {served[:12]}): refusing to deploy",
                         "re-run the pipeline so the deployed checkpoint is the validated one")
    if validation.card_sha256:
        card_uri = f"{quantized.uri.rstrip('/')}/{CARD_FILE}"
        try:
            card = read_uri(card_uri)
        except FileNotFoundError:
            raise StageError(STAGE, f"model card {card_uri} is missing: refusing to deploy",
                             "re-run the pipeline to re-validate (it writes the card)") from None
        if hashlib.sha256(card).hexdigest() != validation.card_sha256:
            raise StageError(STAGE, f"model card {card_uri} was modified after the validate stage "
                             "wrote it: refusing to deploy",
                             "re-run the pipeline to re-validate (the card is generated from the report)")
    return report
