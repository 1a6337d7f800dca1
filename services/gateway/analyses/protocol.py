"""Request and response models of /v1/analyses."""

from pydantic import BaseModel

from shared.findings import Findings


class AnalysisResponse(BaseModel):
    findings: Findings
