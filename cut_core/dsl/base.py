"""The base of every DSL section (forbids unknown fields, validates on assignment) and the canonical columns."""

from __future__ import annotations


from pydantic import BaseModel, ConfigDict


CANONICAL_COLUMNS = ("instruction", "input", "response", "judgment")

class Section(BaseModel):
    """Base of every DSL section: unknown fields are errors, values are re-validated on assignment."""

    # inf (threshold = +inf disables flagging) serialises as the string "Infinity": valid JSON.
    # hide_input_in_errors: a ValidationError's text never repeats a value (a key pasted into the
    # wrong field would otherwise reach logs); format_validation_error shows values it deems safe.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="strings",
                              hide_input_in_errors=True)
