"""The prompt: LLaVA v0's "simple" template renders the service's messages as the published
RetinalGPT weights were trained, whether content comes as a string or as parts (vLLM)."""

from __future__ import annotations

import jinja2

from services.language.prompting import RETINALGPT_V0_TEMPLATE, build_messages


def _render(messages: list[dict[str, object]]) -> str:
    template = jinja2.Environment().from_string(RETINALGPT_V0_TEMPLATE)
    return template.render(messages=messages, bos_token="<s>", add_generation_prompt=True)


def test_v0_template_renders_the_simple_conversation_format() -> None:
    messages = build_messages(
        "CDR 0.45.",
        [("user", "What is the CDR?"), ("assistant", "It is 0.45."), ("user", "And the AVR?")],
        with_image=True,
    )
    rendered = _render(messages)
    assert rendered.startswith("<s>You are RetinalGPT")
    assert "Measurements:\nCDR 0.45.###Human: <image>\nWhat is the CDR?###" in rendered
    assert rendered.endswith("###Assistant: It is 0.45.###Human: And the AVR?###Assistant:")


def test_v0_template_takes_system_content_as_parts_too() -> None:
    as_parts = [
        {"role": "system", "content": [{"type": "text", "text": "Facts."}]},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "Q"},
            ],
        },
    ]
    assert _render(as_parts) == "<s>Facts.###Human: <image>\nQ###Assistant:"
