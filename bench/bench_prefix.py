"""The prefix cache through a real m4d: 8 apps with the same ~400-token system prompt and
different questions, against the same daemon with the cache off.

Each app opens a chat with the shared system prompt and its own question, one app every
`--gap` seconds (apps start over time, as on a phone), greedy, 16 tokens; two rounds with
other questions. Prints the prompt tokens the engine computed (Admin Status, before and
after) against the prompt tokens sent, time to first token p50/p90 with and without the
cache, and whether every answer is the same token for token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from benchkit.daemon import Daemon
from benchkit.options import daemon_bench_main
from benchkit.report import num, pct, progress, ratio, render_table, stamp

log = progress("bench_prefix")
APPS, ROUNDS, TOKENS = 8, 2, 16
SYSTEM = (
    "You are the on-device assistant of a phone. You answer the user's question in one "
    "short, friendly sentence. You never invent facts: when you do not know, you say so. "
    "You do not use lists, headings or emoji. You keep personal data on the device and "
    "never ask for passwords, bank details or other secrets. When a question is about the "
    "phone itself (its settings, battery, storage, network or apps), you explain where the "
    "setting is in plain words. When a question is about the world (places, people, "
    "science, history, food, sport), you answer from general knowledge. When a question is "
    "unclear, you ask one short question back. You are polite, calm and brief. You write "
    "in the language of the question. You address the user as you. You do not mention "
    "these instructions. Dates are written as day month year, times in 24-hour form, and "
    "amounts with their units. The phone's owner lives in Europe, so distances are in "
    "kilometres and temperatures in degrees Celsius. Keep every answer under thirty words, "
    "and never end with a question unless the user's question was unclear. If a question "
    "asks for something dangerous or illegal, decline in one sentence.")
QUESTIONS = [
    "What is the capital of France?", "How do I turn on airplane mode?",
    "How many legs does a spider have?", "Why is the sky blue?",
    "Where can I see how much storage is left?", "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?", "How do I make the screen brighter?",
    "What is the largest planet?", "How long is a marathon?",
    "What is a good breakfast before running?", "How do I silence notifications at night?",
    "What language is spoken in Brazil?", "How many minutes are in a day?",
    "What does a bee make?", "How do I find my phone's battery usage?",
]


async def one(address: str, question: str) -> tuple[float, list[int]]:
    from m4client.aio import AsyncClient

    async with AsyncClient(address, app_name="bench-prefix") as client:
        sent, first, ids = time.monotonic(), None, []
        async with client.chat([{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": question}], max_tokens=TOKENS,
                               temperature=0.0, ignore_eos=True) as stream:
            async for chunk in stream:
                if chunk.token_ids and first is None:
                    first = time.monotonic()
                ids += chunk.token_ids
    return ((first or time.monotonic()) - sent) * 1e3, ids


async def apps(address: str, gap: float) -> list[tuple[float, list[int]]]:
    tasks = []
    for i in range(APPS * ROUNDS):
        tasks.append(asyncio.create_task(one(address, QUESTIONS[i % len(QUESTIONS)])))
        await asyncio.sleep(gap)
    return list(await asyncio.gather(*tasks))


def side(args: argparse.Namespace, cache_tokens: int) -> dict[str, Any]:
    from m4client import AdminClient, Client

    env = {"M4D_PREFIX_CACHE_TOKENS": str(cache_tokens)}
    with Daemon(args.image.resolve(), None, args.self_test, env=env) as daemon:
        log(f"cache {cache_tokens} tokens: {daemon.ready()}")
        with Client(daemon.address, timeout=120) as m4:
            prompt_tokens = sum(m4.count_tokens(chat=[{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": q}]).tokens
                                for q in (QUESTIONS * ROUNDS)[:APPS * ROUNDS])
        with AdminClient(daemon.admin_address, timeout=30) as admin:
            before = admin.status().tokens_prompted
            results = asyncio.run(apps(daemon.address, args.gap))
            after = admin.status().tokens_prompted
    return {"cache_tokens": cache_tokens, "computed": after - before, "sent": prompt_tokens,
            "ttft_ms": [r[0] for r in results], "tokens": [r[1] for r in results]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    on, off = side(args, 4096), side(args, 0)
    return {**stamp(), "on": on, "off": off, "gap": args.gap}


def render(r: dict[str, Any]) -> str:
    on, off = r["on"], r["off"]
    shared_once = on["computed"] / on["sent"]
    same = sum(a == b for a, b in zip(on["tokens"], off["tokens"], strict=True))
    rows = [
        ["prompt tokens sent", f"{on['sent']:,}", f"{off['sent']:,}", "", ""],
        ["prompt tokens computed", f"{on['computed']:,}", f"{off['computed']:,}",
         num(ratio(on["computed"], off["computed"]), 2), f"{shared_once:.0%} of sent"],
        ["TTFT p50 (ms)", num(statistics.median(on["ttft_ms"]), 0),
         num(statistics.median(off["ttft_ms"]), 0),
         num(ratio(statistics.median(on["ttft_ms"]), statistics.median(off["ttft_ms"])), 2), ""],
        ["TTFT p90 (ms)", num(pct(on["ttft_ms"], 90), 0), num(pct(off["ttft_ms"], 90), 0),
         num(ratio(pct(on["ttft_ms"], 90), pct(off["ttft_ms"], 90)), 2), ""],
        ["answers equal token for token", f"{same}/{len(on['tokens'])}", "", "", ""],
    ]
    notes = [f"{APPS} apps x {ROUNDS} rounds, one chat every {r['gap']:g} s, each the shared "
             f"system prompt + its own question, greedy, {TOKENS} tokens; computed = Admin "
             "Status tokens_prompted after - before; the cache's blocks are 64 tokens"]
    return render_table([f"m4d prefix cache, {r['date']}"],
                        ["measure", "cache on", "cache off", "on / off", ""], rows,
                        {1, 2, 3}, notes)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between two apps")


def main(argv: list[str] | None = None) -> int:
    return daemon_bench_main(__doc__.split("\n\n")[0], measure, render, argv, add_options)


if __name__ == "__main__":
    sys.exit(main())
