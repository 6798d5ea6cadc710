"""The tokenizer's endpoints: /tokenize, /detokenize, /apply-template (llama.cpp's server has the same)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends

from anchorkv.server.schemas import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest, tool_dicts
from anchorkv.server.service import Service, dicts


def router(svc: Service) -> APIRouter:
    r = APIRouter(dependencies=[Depends(svc.auth)])
    engine = svc.engine

    @r.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a prompt as the completion endpoints would see it. For messages also each message's
        end as a token count: what `prompt_cache_anchor_tokens` takes to anchor through that message."""
        out: dict[str, Any] = {}
        if req.messages is not None:
            rendered = await svc.render(
                dicts(req.messages), tool_dicts(req.tools), add_generation_prompt=req.add_generation_prompt
            )
            ids, out["message_ends"] = rendered.token_ids, rendered.message_ends
        else:
            ids = await asyncio.to_thread(engine.tokenizer.encode, req.content or "")
        out["tokens"] = (
            [{"id": t, "piece": _piece(engine.tokenizer.token_bytes(t))} for t in ids] if req.with_pieces else ids
        )
        return out

    @r.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        svc.check_vocab(req.tokens, "tokens")
        return {"content": engine.tokenizer.decode(req.tokens)}

    @r.post("/apply-template")
    async def apply_template(req: ApplyTemplateRequest) -> dict[str, Any]:
        return {"prompt": (await svc.render(dicts(req.messages), tool_dicts(req.tools))).text}

    return r


def _piece(raw: bytes) -> str | list[int]:
    """A token's text, or its bytes where it holds part of a UTF-8 character (as llama.cpp's /tokenize)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return list(raw)
