"""Request and response models of /v1/analyses."""

import datetime as dt

from pydantic import BaseModel, Field

from shared.findings import Findings


class AnalysisResponse(BaseModel):
    id: str = Field(description="Use it with GET /v1/analyses/{id} and its overlays")
    created_at: dt.datetime
    cached: bool = Field(
        description="True when this image had already been analysed by the same models with "
        "the same options (the stored result is returned)"
    )
    overlays: dict[str, str] = Field(
        default_factory=dict, description="Overlay layer -> URL of its PNG"
    )
    findings: Findings
