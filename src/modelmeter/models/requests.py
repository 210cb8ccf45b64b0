"""The inference requests, as the routes and the Batch API's lines take them (one model each, validated the same
way whether the body came over HTTP or from a line of a batch file)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictStr

from modelmeter.fields import INTEGRAL

Text = Annotated[StrictStr, Field(min_length=1)]
Inputs = Text | Annotated[list[Text], Field(min_length=1)]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    input: Inputs
    truncate: StrictBool = False


Strategy = Literal["simple", "first", "average", "max", "none"]


class EntitiesRequest(BaseModel):
    """Named entities in each input, grouped as Hugging Face's ``aggregation_strategy`` says."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    input: Inputs
    aggregation_strategy: Strategy = "simple"
    truncate: StrictBool = False


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; token-array inputs and ``dimensions`` other than the model's are refused."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Strict(), Field(gt=0), INTEGRAL] | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None
    truncate: StrictBool = False


