"""m4ctl as a user runs it, against a real daemon on the real default image."""

from __future__ import annotations

import json
import re
import subprocess
import sys


def m4ctl(daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m4ctl", *args], capture_output=True,
                          text=True, timeout=timeout, env=daemon.env())


def test_generate_answers_the_question(daemon) -> None:
    out = m4ctl(daemon, "generate", "--temperature", "0", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_generate_json_prints_each_message(daemon) -> None:
    out = m4ctl(daemon, "--json", "generate", "--temperature", "0", "--max-tokens", "6",
                "--task", "complete", "The capital of France is")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) >= 2
    assert lines[-1]["finishReason"] == "FINISH_REASON_LENGTH"
    assert lines[-1]["usage"]["completionTokens"] == 6
    assert "Paris" in "".join(m.get("text", "") for m in lines)


def test_chat_keeps_the_conversation(daemon) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "m4ctl", "chat", "--temperature", "0", "--max-tokens", "40",
         "--stats"],
        input="My name is Ada.\nWhat is my name?\n", capture_output=True, text=True,
        timeout=180, env=daemon.env())
    assert out.returncode == 0, out.stderr
    usage = [tuple(int(n) for n in re.findall(r"(\d+) (?:prompt|completion)", line))
             for line in out.stderr.splitlines() if line.startswith("tokens:")]
    assert len(usage) == 2, out.stderr
    (p1, c1), (p2, _) = usage
    # the second turn carries the first question and answer (the 135M model's memory of
    # them is its own business; the history reaching it is ours)
    assert p2 > p1 + c1, out.stderr
    assert len([line for line in out.stdout.splitlines() if line.strip()]) >= 2


def test_embed_json_has_unit_vectors(daemon) -> None:
    out = m4ctl(daemon, "--json", "embed", "some text", "other text")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["dimensions"] == 384 and len(reply["embeddings"]) == 2
    norm = sum(v * v for v in reply["embeddings"][0]["values"]) ** 0.5
    assert abs(norm - 1.0) < 1e-3


def test_classify_predict_tasks_status(daemon) -> None:
    out = m4ctl(daemon, "classify", "--labels", "sports,politics,tech",
                "The new phone has a faster chip and a better camera.")
    assert out.returncode == 0 and out.stdout.split()[0] == "tech", out.stdout
    out = m4ctl(daemon, "predict-next", "The capital of France is")
    assert out.returncode == 0 and "Paris" in out.stdout
    out = m4ctl(daemon, "tasks")
    assert out.returncode == 0 and "predict-next" in out.stdout and "T1" in out.stdout
    understand = next(line.split() for line in out.stdout.splitlines() if line.startswith("understand "))
    assert understand[1:5] == ["T49", "2", "backbone", "slu"] and understand[-2:] == ["(JSON", "schema)"]
    out = m4ctl(daemon, "status")
    assert out.returncode == 0 and "m4-default" in out.stdout and "READY" in out.stdout.upper()


def test_bad_input_is_one_line_and_exit_1(daemon) -> None:
    out = m4ctl(daemon, "generate", "--top-p", "1.5", "hello")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "m4ctl: error: INVALID_ARGUMENT: top_p must be in (0, 1] (got 1.5)"]


def test_transcribe_keywords_ocr_and_ask_from_files(daemon, tmp_path) -> None:
    from tests import rendering, speech

    wav = tmp_path / "speech.wav"
    wav.write_bytes(speech.synthesize("Please call the dentist tomorrow morning."))
    out = m4ctl(daemon, "transcribe", str(wav))
    assert out.returncode == 0, out.stderr
    assert "dentist" in out.stdout.lower()

    out = m4ctl(daemon, "--json", "keywords", str(wav), "-k", "dentist,pizza")
    assert out.returncode == 0, out.stderr
    hits = {k["keyword"]: k["detected"] for k in json.loads(out.stdout)["keywords"]}
    assert hits == {"dentist": True, "pizza": False}

    png = tmp_path / "sign.png"
    png.write_bytes(rendering.render_lines(["Platform 9", "Exit on the left"], "DejaVuSans.ttf", 36))
    out = m4ctl(daemon, "ocr", str(png))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["Platform 9", "Exit on the left"]
    out = m4ctl(daemon, "ocr", "--boxes", str(png))
    assert out.returncode == 0 and "Platform 9" in out.stdout and "CORNERS" in out.stdout

    out = m4ctl(daemon, "ask", "--image", str(png), "--show-source", "--temperature", "0",
                "--max-tokens", "24", "Which platform is it?")
    assert out.returncode == 0, out.stderr
    first, *answer = out.stdout.splitlines()
    assert first.startswith("[read: Platform 9")
    assert "9" in " ".join(answer)

    out = m4ctl(daemon, "run", "ocr", "--input", f"image=@{png}")
    assert out.returncode == 0 and "Platform 9" in out.stdout, out.stderr
    out = m4ctl(daemon, "ocr", str(tmp_path / "missing.png"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_generate_with_a_schema_writes_json_that_validates(daemon, tmp_path) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"enum": ["France", "Germany", "Italy"]}},
        "required": ["city", "country"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    out = m4ctl(daemon, "generate", "--temperature", "0", "--max-tokens", "64", "--schema",
                str(path), "The capital of France as JSON:")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    jsonschema.validate(answer, schema)
    assert answer["country"] == "France"
    out = m4ctl(daemon, "generate", "--temperature", "0", "--choices", "yes,no",
                "Is Paris in France? Answer yes or no:")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("yes", "no")


def test_an_invalid_schema_is_invalid_argument_on_one_line(daemon, tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"type": "objectx"}')
    out = m4ctl(daemon, "generate", "--schema", str(path), "hello")
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("m4ctl: error: INVALID_ARGUMENT: response_format.json_schema")
    assert "objectx" in line


def test_count_tokens_matches_what_generate_feeds_and_tasks_show_their_window(daemon) -> None:
    from m4client import Client

    question = "What is the capital of France?"
    with Client(daemon.address, timeout=120) as m4:
        counted = m4.count_tokens(chat=[{"role": "user", "content": question}])
        result = m4.chat_complete([{"role": "user", "content": question}], max_tokens=4,
                                  temperature=0.0)
        raw = m4.count_tokens(question, task="complete")
        windows = {t.id: t.context_window for t in m4.list_tasks()}
    assert counted.tokens == result.usage.prompt_tokens  # the chat template's tokens too
    assert raw.tokens < counted.tokens
    assert counted.context_window == windows["chat"] > 0 and counted.room > 0
    assert windows["embed"] > 0 and windows["embed"] != windows["chat"]
    out = m4ctl(daemon, "count-tokens", "--task", "complete", question)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{raw.tokens} tokens of {raw.context_window} ")
    out = m4ctl(daemon, "count-tokens", "--task", "embed", question)
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr


def test_a_shared_system_prompt_is_computed_once_and_status_counts_it(daemon) -> None:
    from m4client import Client

    system = "You are the calendar assistant of a phone. Answer in one short sentence. " * 20
    questions = ["What day comes after Monday?", "What month comes after May?"]
    before = json.loads(m4ctl(daemon, "--json", "status").stdout)
    with Client(daemon.address, timeout=120) as m4:
        results = [m4.chat_complete([{"role": "system", "content": system},
                                     {"role": "user", "content": q}],
                                    max_tokens=8, temperature=0.0) for q in questions]
    after = json.loads(m4ctl(daemon, "--json", "status").stdout)
    computed = int(after["tokensPrompted"]) - int(before.get("tokensPrompted", 0))
    reused = int(after["prefixTokensReused"]) - int(before.get("prefixTokensReused", 0))
    sent = sum(r.usage.prompt_tokens for r in results)
    assert reused >= 64 * 3, "the second call's system prompt came from the cache"
    assert computed == sent - reused
    assert int(after["prefixCacheTokens"]) >= reused
    out = m4ctl(daemon, "status")
    assert "from the prefix cache" in out.stdout


def test_chat_keeps_its_session_in_the_daemon_across_runs(daemon) -> None:
    greedy = ("--temperature", "0", "--max-tokens", "16")
    first = m4ctl(daemon, "chat", "--keep", "--stats", *greedy, "-m", "My name is Ada.")
    assert first.returncode == 0, first.stderr
    session = re.search(r"session: (\S+)", first.stderr)
    assert session, first.stderr
    total = int(re.search(r"= (\d+);", first.stderr).group(1))
    second = m4ctl(daemon, "chat", "--session", session.group(1), "--stats", *greedy,
                   "-m", "What is my name?")
    assert second.returncode == 0, second.stderr
    prompt = int(re.search(r"tokens: (\d+) prompt", second.stderr).group(1))
    assert prompt > total, "the second run's turn carries the first one"
    assert re.search(r"context: \d+ of \d+ tokens", second.stderr)
    gone = m4ctl(daemon, "chat", "--session", session.group(1), "-m", "Hello?")
    assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr  # deleted without --keep
