"""Structured output through a real m4d: 200 generations over 12 JSON schemas (nested
objects, arrays, enums, numbers with bounds, patterns, required fields), each also run
unconstrained, greedy, 8 at a time.

Prints one table: how many constrained outputs parse and validate (`jsonschema`), the decode
speed per token constrained against unconstrained (the daemon's own `decode_ms` over the
tokens after the first, summed over the requests, in the same run), and, for the requests
whose unconstrained output already starts with JSON that validates, whether the constrained
output is exactly that JSON (the mask never changes a token the model would have chosen).

The speed is compared on the same work: the unconstrained run of a request generates as many
tokens as its constrained run did (max_tokens = that count, ignore_eos). A constrained JSON
answer is far shorter than a free one (6k against 32k tokens over 200 requests), so free-length
runs would compare a prefill-heavy mix (each arrival's prompt interleaved with few decode
tokens) against a decode-heavy one, not the mask's cost. The equality check uses a free run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from benchkit.daemon import Daemon
from benchkit.options import daemon_bench_main
from benchkit.report import num, progress, ratio, render_table, stamp

log = progress("bench_structured")
CONCURRENCY, MAX_TOKENS = 8, 160
TARGET_VALID, TARGET_SPEED = 1.0, 0.9

S = {"type": "string", "maxLength": 24}
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("person", {"type": "object", "properties": {"name": S, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"],
        "additionalProperties": False}),
    ("intent", {"type": "object", "properties": {
        "intent": {"enum": ["turn_on_light", "turn_off_light", "set_timer", "play_music"]},
        "slots": {"type": "object", "properties": {"room": S, "minutes": {
            "type": "integer", "minimum": 1, "maximum": 600}}, "additionalProperties": False}},
        "required": ["intent", "slots"], "additionalProperties": False}),
    ("numbers", {"type": "array", "items": {"type": "number", "minimum": -1000,
                                            "maximum": 1000}, "minItems": 2, "maxItems": 5}),
    ("weather", {"type": "object", "properties": {"city": S, "temp_c": {
        "type": "number", "minimum": -50, "maximum": 60}, "conditions": {
        "enum": ["sunny", "cloudy", "rain", "snow"]}}, "required": ["city", "temp_c",
                                                                  "conditions"],
        "additionalProperties": False}),
    ("todo", {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3,
              "items": {"type": "object", "properties": {"task": S, "done": {
                  "type": "boolean"}}, "required": ["task", "done"],
                  "additionalProperties": False}}}, "required": ["items"],
              "additionalProperties": False}),
    ("address", {"type": "object", "properties": {"street": S, "city": S, "zip": {
        "type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city", "zip"],
        "additionalProperties": False}),
    ("product", {"type": "object", "properties": {"name": S, "price": {
        "type": "number", "minimum": 0, "maximum": 10000}, "tags": {
        "type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "in_stock": {"type": "boolean"}}, "required": ["name", "price", "in_stock"],
        "additionalProperties": False}),
    ("event", {"type": "object", "properties": {"title": S, "date": {
        "type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"}, "attendees": {
        "type": "integer", "minimum": 1, "maximum": 500}}, "required": ["title", "date"],
        "additionalProperties": False}),
    ("sentiment", {"type": "object", "properties": {"label": {
        "enum": ["positive", "negative", "neutral"]}, "score": {
        "type": "number", "minimum": 0, "maximum": 1}}, "required": ["label", "score"],
        "additionalProperties": False}),
    ("book", {"type": "object", "properties": {"title": S, "author": {
        "type": "object", "properties": {"first": S, "last": S}, "required": ["last"],
        "additionalProperties": False}, "year": {"type": "integer", "minimum": 1500,
                                                 "maximum": 2030}},
        "required": ["title", "author", "year"], "additionalProperties": False}),
    ("color", {"type": "object", "properties": {c: {"type": "integer", "minimum": 0,
                                                    "maximum": 255} for c in "rgb"},
               "required": ["r", "g", "b"], "additionalProperties": False}),
    ("translation", {"type": "object", "properties": {"source_lang": {
        "enum": ["en", "fr", "de"]}, "text": {"type": "string", "maxLength": 40}},
        "required": ["source_lang", "text"], "additionalProperties": False}),
]
# What each request is about: the schema's name and a subject, in a prompt that shows the
# schema (a small model writes JSON more often when it sees one).
SUBJECTS = ["Paris", "a cat", "the weather", "a birthday party", "a red car", "a novel",
            "a shopping list", "a concert", "a laptop", "a recipe", "a train trip",
            "a football match", "a garden", "a museum", "a phone call", "a movie", "a hotel"]


@dataclass
class Outcome:
    schema: str
    text: str
    tokens: int
    decode_ms: float
    token_ids: tuple[int, ...] = ()


def prompt(name: str, schema: dict[str, Any], subject: str) -> str:
    return (f"Write one JSON value about {subject} that follows this JSON Schema ({name}):\n"
            f"{json.dumps(schema)}\nJSON:")


def json_prefix(text: str) -> tuple[Any, str] | None:
    """The JSON value the text starts with (after spaces) and its text, if any."""
    stripped = text.lstrip()
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None
    return value, stripped[:end]


Job = tuple[str, str, dict[str, Any] | None, int]  # schema name, prompt, format, max_tokens


async def run_all(address: str, jobs: list[Job]) -> list[Outcome]:
    from m4client.aio import AsyncClient

    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(client: AsyncClient, name: str, text: str, schema: dict[str, Any] | None,
                  max_tokens: int) -> Outcome:
        async with gate:  # an unconstrained run shorter than MAX_TOKENS matches a constrained
            result = await client.complete(text, task="complete", temperature=0.0,
                                           max_tokens=max_tokens, json_schema=schema,
                                           ignore_eos=schema is None and max_tokens < MAX_TOKENS)
        return Outcome(name, result.text, result.usage.completion_tokens,
                       result.timings.decode_ms if result.timings else 0.0, result.token_ids)

    async with AsyncClient(address, app_name="bench-structured") as client:
        return list(await asyncio.gather(*(one(client, *job) for job in jobs)))


def agreement(image: Path, constrained: list[Outcome], free: list[Outcome],
              schemas: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """(requests whose constrained tokens equal the free run's up to the first free token
    the schema forbids, tokens compared in all): the mask changed no token the model chose
    while its own choice was still valid."""
    from m4d.prepare.constraints import Grammars, ResponseFormat

    manifest = json.loads((image / "manifest.json").read_text())
    backbone = next(c for c in manifest["components"].values() if c["kind"] == "llama")
    grammars = Grammars(image / backbone["tokenizer"], [int(backbone["config"]["eos_id"])],
                        int(backbone["config"]["vocab_size"]))
    equal = compared = 0
    for c, f in zip(constrained, free, strict=True):
        matcher = grammars.compile(ResponseFormat(
            "json_schema", json_schema=json.dumps(schemas[c.schema]))).matcher
        valid = 0
        for token in f.token_ids:
            if not matcher.consume_token(token):
                break
            valid += 1
        compared += valid
        equal += c.token_ids[:valid] == f.token_ids[:valid]
    return equal, compared


def ms_per_token(outcomes: list[Outcome]) -> float | None:
    tokens = sum(max(0, o.tokens - 1) for o in outcomes)
    return sum(o.decode_ms for o in outcomes) / tokens if tokens else None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    jobs: list[Job] = [(name, prompt(name, schema, SUBJECTS[i % len(SUBJECTS)]), schema,
                        MAX_TOKENS)
                       for i in range(args.requests) for name, schema in [SCHEMAS[i % len(SCHEMAS)]]]
    schemas = dict(SCHEMAS)
    with Daemon(args.image.resolve(), None, args.self_test) as daemon:
        log(str(daemon.ready()))
        asyncio.run(run_all(daemon.address, jobs[:8]))  # warm-up
        runs: dict[str, list[Outcome]] = {}

        def run(side: str, batch: list[Job]) -> list[Outcome]:
            log(f"{side}: {len(batch)} requests, {CONCURRENCY} at a time")
            started = time.monotonic()
            outs = asyncio.run(run_all(daemon.address, batch))
            log(f"  {time.monotonic() - started:.1f} s")
            runs.setdefault(side.split()[0], []).extend(outs)
            return outs

        for again in ("", " again"):
            lengths = [o.tokens for o in run("constrained" + again, jobs)]
            run("matched" + again, [(n, t, None, max(1, k))
                                    for (n, t, _, _), k in zip(jobs, lengths, strict=True)])
        run("free", [(n, t, None, m) for n, t, _, m in jobs])
    constrained, matched, free = runs["constrained"], runs["matched"], runs["free"]
    valid, failures = 0, []
    for o in constrained:
        try:
            jsonschema.validate(json.loads(o.text), schemas[o.schema])
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            failures.append(f"{o.schema}: {o.text[:80]!r}: {str(exc).splitlines()[0][:80]}")
    fits = same = 0
    for c, f in zip(constrained[:len(jobs)], free[:len(jobs)], strict=True):
        found = json_prefix(f.text)
        if found is None:
            continue
        try:
            jsonschema.validate(found[0], schemas[f.schema])
        except jsonschema.ValidationError:
            continue
        fits += 1
        same += c.text.strip() == found[1]
    speed_c, speed_f = ms_per_token(constrained), ms_per_token(matched)
    agreed, compared = agreement(args.image.resolve(), constrained[:len(jobs)], free, schemas)
    free_valid = sum(json_prefix(o.text) is not None for o in free[:len(jobs)])
    return {**stamp(), "requests": len(jobs), "schemas": len(SCHEMAS), "valid": valid,
            "checked": len(constrained), "failures": failures[:5],
            "ms_per_token_constrained": speed_c, "ms_per_token_free": speed_f,
            "speed_ratio": ratio(speed_f, speed_c), "fits": fits, "same": same,
            "agreed": agreed, "compared": compared,
            "free_starts_with_json": free_valid,
            "tokens_constrained": sum(o.tokens for o in constrained) / 2,
            "tokens_matched": sum(o.tokens for o in matched) / 2,
            "tokens_free": sum(o.tokens for o in free)}


def render(r: dict[str, Any]) -> str:
    valid_share = r["valid"] / r["checked"]
    rows = [
        ["constrained outputs that parse and validate", f"{r['valid']}/{r['checked']}",
         f"{TARGET_VALID:.0%}", "yes" if valid_share >= TARGET_VALID else "NO"],
        ["decode ms/token, constrained", num(r["ms_per_token_constrained"], 2), "", ""],
        ["decode ms/token, unconstrained (as many tokens)", num(r["ms_per_token_free"], 2), "",
         ""],
        ["decode speed, constrained / unconstrained", num(r["speed_ratio"], 2),
         f">= {TARGET_SPEED:g}",
         "yes" if (r["speed_ratio"] or 0) >= TARGET_SPEED else "NO"],
        ["unconstrained output that already fits: constrained equal",
         f"{r['same']}/{r['fits']}", "all", "yes" if r["same"] == r["fits"] else "NO"],
        ["constrained = free tokens while the free ones keep to the schema",
         f"{r['agreed']}/{r['requests']}", "all",
         "yes" if r["agreed"] == r["requests"] else "NO"],
    ]
    notes = [f"{r['requests']} requests over {r['schemas']} schemas, greedy, {CONCURRENCY} at a "
             "time, twice per side (constrained, then unconstrained with max_tokens = the "
             "constrained run's tokens and ignore_eos, alternating); decode ms/token = the "
             "daemon's decode_ms / (tokens - 1), summed",
             f"tokens per run: constrained {r['tokens_constrained']:.0f}, matched "
             f"{r['tokens_matched']:.0f}; a free run (max_tokens {MAX_TOKENS}) for the equality "
             f"check: {r['tokens_free']:.0f} tokens, {r['free_starts_with_json']}/"
             f"{r['requests']} start with a JSON value",
             f"the free runs keep to their schemas for {r['compared']} tokens in all "
             f"({r['compared'] / r['requests']:.1f} a request) before the first token the "
             "schema forbids; up to there the constrained run must choose the same tokens",
             f"first failures: {r['failures'] or 'none'}"]
    return render_table([f"m4d structured output, {r['date']}"],
                        ["measure", "value", "target", "met"], rows, {1}, notes)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=200)


def main(argv: list[str] | None = None) -> int:
    return daemon_bench_main(__doc__.split("\n\n")[0], measure, render, argv, add_options)


if __name__ == "__main__":
    sys.exit(main())
