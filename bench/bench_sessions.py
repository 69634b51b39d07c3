"""Sessions through a real m4d: a 10-turn chat kept by the daemon, against re-sending the
whole history each turn to a daemon without the prefix cache (the stateless way).

Each turn is a user message of about the same length, answered greedily (24 tokens at most).
Prints per turn the prompt tokens, the time to first token (client side, from the request
to the first text) and the prompt tokens the engine computed (Admin Status, before and
after) on both sides, and whether the replies are the same. Issue 17's targets: TTFT of
turn 10 <= 1.3x turn 1 in the session; replies identical to re-sending the history.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from benchkit.daemon import Daemon
from benchkit.options import daemon_bench_main
from benchkit.report import num, progress, ratio, render_table, stamp

log = progress("bench_sessions")
TURNS, TOKENS, REPEATS = 10, 24, 3
def instructions(rep: int) -> str:
    """Each conversation its own system prompt: nothing is shared across them, so every
    turn's cache hits are its own session's."""
    return f"You are the helpful assistant of phone number {rep + 1}. Answer in one short sentence."
TOPICS = ["bees", "rivers", "trains", "clouds", "pianos", "deserts", "owls", "bridges",
          "tomatoes", "comets"]


def message(i: int) -> str:
    return f"Tell me one surprising fact about {TOPICS[i % len(TOPICS)]}, please."


def timed(stream: Any) -> tuple[float, str, int, int]:
    """(ms to the first text, the text, prompt tokens, context tokens) of a streamed reply."""
    sent, first, text, prompt, context = time.monotonic(), None, [], 0, 0
    with stream:
        for chunk in stream:
            if chunk.text and first is None:
                first = time.monotonic()
            text.append(chunk.text)
            if chunk.usage is not None:
                prompt = chunk.usage.prompt_tokens
            if chunk.session is not None:
                context = chunk.session.context_tokens
    return ((first or time.monotonic()) - sent) * 1e3, "".join(text), prompt, context


def session_side(args: argparse.Namespace) -> list[dict[str, Any]]:
    from m4client import AdminClient, Client

    rows: list[dict[str, Any]] = []
    with Daemon(args.image.resolve(), None, args.self_test) as daemon:
        log(f"session side: {daemon.ready()}")
        with Client(daemon.address, timeout=300) as m4, \
                AdminClient(daemon.admin_address, timeout=30) as admin:
            for rep in range(REPEATS):
                with m4.session(instructions(rep)) as chat:
                    for i in range(TURNS):
                        before = admin.status().tokens_prompted
                        ms, text, prompt, context = timed(chat.send(
                            message(i), max_tokens=TOKENS, temperature=0.0))
                        rows.append({"rep": rep, "turn": i + 1, "ttft_ms": ms, "text": text,
                                     "prompt": prompt, "context": context,
                                     "computed": admin.status().tokens_prompted - before})
    return rows


def resend_side(args: argparse.Namespace) -> list[dict[str, Any]]:
    from m4client import AdminClient, Client

    rows: list[dict[str, Any]] = []
    env = {"M4D_PREFIX_CACHE_TOKENS": "0"}
    with Daemon(args.image.resolve(), None, args.self_test, env=env) as daemon:
        log(f"re-send side: {daemon.ready()}")
        with Client(daemon.address, timeout=300) as m4, \
                AdminClient(daemon.admin_address, timeout=30) as admin:
            for rep in range(REPEATS):
                history = [{"role": "system", "content": instructions(rep)}]
                for i in range(TURNS):
                    history.append({"role": "user", "content": message(i)})
                    before = admin.status().tokens_prompted
                    ms, text, prompt, _ = timed(m4.chat(history, max_tokens=TOKENS,
                                                        temperature=0.0))
                    history.append({"role": "assistant", "content": text})
                    rows.append({"rep": rep, "turn": i + 1, "ttft_ms": ms, "text": text,
                                 "prompt": prompt,
                                 "computed": admin.status().tokens_prompted - before})
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    return {**stamp(), "session": session_side(args), "resend": resend_side(args)}


def _median(rows: list[dict[str, Any]], turn: int, key: str) -> float:
    return statistics.median(r[key] for r in rows if r["turn"] == turn)


def render(r: dict[str, Any]) -> str:
    s, b = r["session"], r["resend"]
    table = []
    for turn in range(1, TURNS + 1):
        same = all(x["text"] == y["text"] for x, y in zip(s, b, strict=True)
                   if x["turn"] == turn)
        table.append([str(turn), num(_median(s, turn, "prompt"), 0),
                      num(_median(s, turn, "computed"), 0), num(_median(s, turn, "ttft_ms"), 0),
                      num(_median(b, turn, "computed"), 0), num(_median(b, turn, "ttft_ms"), 0),
                      num(ratio(_median(s, turn, "ttft_ms"), _median(b, turn, "ttft_ms")), 2),
                      "yes" if same else "NO"])
    growth_s = ratio(_median(s, TURNS, "ttft_ms"), _median(s, 1, "ttft_ms"))
    growth_b = ratio(_median(b, TURNS, "ttft_ms"), _median(b, 1, "ttft_ms"))
    notes = [f"TTFT turn {TURNS} / turn 1: session {num(growth_s, 2)} (target <= 1.3), "
             f"re-sending {num(growth_b, 2)}",
             f"{REPEATS} conversations per side, medians per turn; greedy, at most {TOKENS} "
             "tokens a reply; computed = Admin Status tokens_prompted after - before; the "
             "re-sending daemon has the prefix cache off (prefix_cache_tokens = 0)"]
    return render_table([f"m4d sessions, {r['date']}"],
                        ["turn", "prompt tokens", "session: computed", "session: TTFT ms",
                         "re-send: computed", "re-send: TTFT ms", "session / re-send",
                         "same reply"], table, {1, 2, 3, 4, 5, 6}, notes)


def main(argv: list[str] | None = None) -> int:
    return daemon_bench_main(__doc__.split("\n\n")[0], measure, render, argv)


if __name__ == "__main__":
    sys.exit(main())
