"""LWM's chat format, written once for every prompt ringlwm builds or trains on:

    {system} USER: {user turn} ASSISTANT: {answer}

Text prompts (book QA examples, the question writer's prompt, the needle evaluation) end in
"ASSISTANT: ", the answer after the space (``chat_prompt``). Vision prompts, as LWM's ``vision_chat.py``
and ``vision_generation.py`` write them, end in " ASSISTANT:" without it: a vision-chat record
(``vision_chat_record``) puts the frames between the user's question and that ending.
"""

from __future__ import annotations

from ringlwm.data.vision_tokens import SPEC_FIELD

CHAT_SYSTEM = "You are a helpful assistant."
CHAT_USER = " USER: "
CHAT_ASSISTANT = " ASSISTANT:"
CHAT_PREFIX = CHAT_SYSTEM + CHAT_USER  # "You are a helpful assistant. USER: ": what comes before the user's turn


def chat_prompt(user: str, *, system: str = CHAT_SYSTEM) -> str:
    """LWM's one-turn text prompt ``"{system} USER: {user} ASSISTANT: "``; the answer follows it."""
    return f"{system}{CHAT_USER}{user}{CHAT_ASSISTANT} "


def vision_chat_record(frames, question: str, answer: str, *, system: str = CHAT_SYSTEM) -> dict:
    """A vision-chat record in LWM's chat layout (``lwm/vision_chat.py``), answer trained:

        [BOS] {system} USER: {question}\\n <vision> ... </vision>  ASSISTANT: {answer} [EOS]

    "\\n" and " ASSISTANT:" are LWM's own strings, each tokenized apart as LWM's sampler does. Encode it
    with ``vision_tokens.encode_vision_example`` (the record carries its own field spec)."""
    return {"vision": frames, "question": f"{system}{CHAT_USER}{question}\n", "prompt_end": CHAT_ASSISTANT,
            "answer": answer, SPEC_FIELD: "[question+vision+prompt_end],answer"}
