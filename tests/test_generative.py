"""Questions in, free-text answers out (data=qa): data, config, metrics, the floor, using and serving the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
from conftest import CHAT_TEMPLATE

from slmkit.cli import main as cli
from slmkit.config import ConfigError, compose, is_generative, to_dict, validate
from slmkit.data import DataError, Example, read_examples, split_examples
from slmkit.evaluate import answer_report, answer_scores, heldout_loss, nearest_neighbour_baseline
from slmkit.inference import Classifier, TorchModel, load, load_prompt_config, save_prompt_config
from slmkit.prompt import build_prompt, parse_output
from slmkit.serve import Server, ServeSettings, create_app


@pytest.fixture
def qa_cfg():
    return compose(["data=qa"])


def write(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def qa(question: str, answer) -> dict:
    return {"Question": question, "Best Answer": answer}


# --- config and data ----------------------------------------------------------------------------------


def test_data_qa_is_generative_in_the_models_chat_turn(qa_cfg):
    d = qa_cfg.data
    assert is_generative(d) and not is_generative(compose().data)
    assert (d.text_column, d.label_column) == ("Question", "Best Answer")
    assert d.template == qa_cfg.model.chat_template
    # Phi-3's turn comes with the model: the template follows model=, not data=.
    assert compose(["data=qa", "model=phi3_mini_4k"]).data.template.startswith("<|user|>\n")


def test_free_text_answers_need_a_marker_after_the_answer(qa_cfg):
    raw = to_dict(qa_cfg)
    raw["data"]["template"] = "Q: {text}\nA: {label}"
    with pytest.raises(ConfigError, match=r"'data.template': free-text answers need an end-of-turn marker"):
        validate(raw)
    raw["data"]["template"] = "Q: {text}\nA: {label}\n###"
    assert validate(raw).data.template.endswith("###")


def test_qa_lines_are_read_with_their_columns_and_answers_keep_their_lines(tmp_path, qa_cfg):
    path = write(
        tmp_path,
        [qa("What is  2 + 2?", " 4 "), qa("Name two colours.", "red\nblue"), qa("what is 2 + 2?", "4")],
    )
    examples, repeats = read_examples(path, qa_cfg.data)
    assert [(e.text, e.label) for e in examples] == [("What is 2 + 2?", "4"), ("Name two colours.", "red\nblue")]
    assert repeats == 1  # the same question (any case) with the same answer


@pytest.mark.parametrize(
    ("rows", "says"),
    [
        ([qa("Where?", "")], r"qa.jsonl:1: 'Best Answer' is empty"),
        ([qa("Where?", 3)], r"qa.jsonl:1: 'Best Answer' must be a string, got int"),
        ([qa("", "here")], r"qa.jsonl:1: 'Question' is empty"),
        ([{"question": "Where?", "Best Answer": "here"}], r"qa.jsonl:1: missing key\(s\) \['Question'\]"),
        ([{"Best Answer": "here", "id": 3}], r"qa.jsonl:1: missing key\(s\) \['Question'\]"),
        (
            [qa("Where is it?", "here"), qa("where is it?", "there")],
            r"qa.jsonl:2: 'Question' also appears at line 1 with answer 'here', here 'there'; keep one answer",
        ),
    ],
)
def test_bad_qa_lines_name_file_line_and_column(tmp_path, qa_cfg, rows, says):
    with pytest.raises(DataError, match=says):
        read_examples(write(tmp_path, rows), qa_cfg.data)


def test_other_columns_of_a_qa_file_are_ignored(tmp_path, qa_cfg):
    """QA files in the wild carry more columns (TruthfulQA: Type, Category, Correct Answers, Source, ...)."""
    row = {"Type": "Adversarial", "Question": "Who?", "Best Answer": "Ana", "Source": "https://example.org"}
    examples, _ = read_examples(write(tmp_path, [row]), qa_cfg.data)
    assert [(e.text, e.label) for e in examples] == [("Who?", "Ana")]


def test_the_split_of_answers_is_one_group_and_deterministic(qa_cfg):
    examples = [Example(f"question {i}?", f"answer {i % 3}", i) for i in range(50)]
    first = split_examples(examples, qa_cfg.data, seed=7)
    assert {k: len(v) for k, v in first.items()} == {"train": 35, "val": 5, "test": 10}
    assert first == split_examples(list(reversed(examples)), qa_cfg.data, seed=7)
    assert first != split_examples(examples, qa_cfg.data, seed=8)
    with pytest.raises(DataError, match=r"the data has 3 example\(s\): too few"):
        split_examples(examples[:3], qa_cfg.data, seed=7)


def test_the_answer_is_the_text_before_the_end_of_turn_marker(qa_cfg):
    d = qa_cfg.data
    assert parse_output(d, " Paris\nFrance <|im_end|>\nmore") == "Paris\nFrance"
    assert parse_output(d, "  ") == ""


def test_the_prompt_file_keeps_a_generative_models_answer_length(tmp_path, qa_cfg):
    qa_cfg.data.answer_tokens = 12
    save_prompt_config(qa_cfg.data, tmp_path)
    back = load_prompt_config(tmp_path)
    assert back.labels == [] and back.answer_tokens == 12 and back.template == qa_cfg.data.template
    # A classifier's prompt file has exactly the keys it always had (its folder's bytes do not change).
    save_prompt_config(compose().data, tmp_path)
    assert set(json.loads((tmp_path / "slmkit_prompt.json").read_text())) == {"template", "labels", "max_chars"}


# --- metrics and the floor ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "em", "f1"),
    [
        ("The Shed.", "shed", 1.0, 1.0),  # case, punctuation and articles do not count
        ("in the shed", "shed", 0.0, 2 / 3),  # one extra word: precision 1/2, recall 1
        ("7", "7", 1.0, 1.0),
        ("seven", "7", 0.0, 0.0),
        ("", "7", 0.0, 0.0),
    ],
)
def test_exact_match_and_token_f1_after_squad_normalisation(prediction, reference, em, f1):
    scores = answer_scores(prediction, reference)
    assert scores["exact_match"] == em
    assert scores["token_f1"] == pytest.approx(f1, abs=1e-6)
    assert 0.0 <= scores["rouge_l"] <= 1.0


def test_rouge_l_rewards_the_longest_common_subsequence():
    assert answer_scores("red blue green", "red green")["rouge_l"] == pytest.approx(0.8, abs=1e-6)
    assert answer_scores("green red", "red green")["rouge_l"] == pytest.approx(0.5, abs=1e-6)


def test_the_report_averages_each_answer_and_counts_empty_ones():
    means, per = answer_report(["shed", "7", "Ana"], ["the shed", "", "Ben"])
    assert means == {
        "exact_match": 0.3333,
        "token_f1": 0.3333,
        "rouge_l": means["rouge_l"],
        "empty_rate": 0.3333,
        "n": 3,
    }
    assert [p["exact_match"] for p in per] == [1.0, 0.0, 0.0]


def test_the_nearest_neighbour_floor_answers_with_the_most_similar_training_question():
    train = [
        Example("Where does Ana keep her bike?", "garage", 1),
        Example("How many cats does Ben have?", "3", 2),
        Example("What colour is the door?", "red", 3),
    ]
    test = [Example("How many cats does Cleo have?", "5", 4), Example("What colour is the fence?", "red", 5)]
    metrics, answers = nearest_neighbour_baseline(train, test)
    assert answers == ["3", "red"]
    assert metrics["exact_match"] == 0.5


def test_held_out_loss_is_lower_for_the_answer_the_model_prefers(tiny_model_dirs, qa_cfg):
    """Loss per answer token, on the answer tokens only: the model's own greedy continuation scores lower
    than an answer it would not write."""
    model = TorchModel(tiny_model_dirs["pytorch"], threads=1)
    prompt = build_prompt(compose().data, "I can't stop smiling")
    own = model.generate(prompt, 4)
    assert own.strip()
    mine = heldout_loss(model, [prompt], [own])
    other = heldout_loss(model, [prompt], [" zebra quantum"])
    assert 0 < mine < other


# --- using and serving a generative model -------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_model_dir(tiny_model_dirs, tmp_path_factory) -> Path:
    """The tiny int4 model with a generative prompt file: a chat template, no labels."""
    folder = tmp_path_factory.mktemp("qa_model") / "onnx"
    shutil.copytree(tiny_model_dirs["onnx"], folder)
    data = compose(["data=qa"]).data
    data.template = CHAT_TEMPLATE  # the tiny tokenizer knows Phi-3's chat tokens
    data.answer_tokens = 10
    save_prompt_config(data, folder)
    return folder


QUESTIONS = ["Where is the key?", "How many cats does Ana have?", "I can't stop smiling"]


@pytest.fixture(scope="module")
def qa_clf(qa_model_dir):
    return load(qa_model_dir, batch_size=4, threads=1)


def test_generate_is_each_questions_greedy_answer_cut_at_the_marker(qa_clf):
    answers = qa_clf.generate(QUESTIONS)
    assert qa_clf.generative and qa_clf.max_new_tokens == 10
    for question, answer in zip(QUESTIONS, answers, strict=True):
        alone = qa_clf.model.generate(build_prompt(qa_clf.data, question), 10, stop="<|end|>")
        assert answer == alone.split("<|end|>")[0].strip()
    assert any(answers), "the tiny model writes something for at least one question"
    with pytest.raises(ValueError, match="is a classifier"):
        Classifier(qa_clf.model, compose().data).generate(["x"])


def test_slmkit_generate_prints_answers_in_order_and_json(qa_model_dir, qa_clf, capsys, tmp_path):
    expected = qa_clf.generate(QUESTIONS)
    assert cli(["generate", "--model", str(qa_model_dir), "--threads", "1", *QUESTIONS]) == 0
    assert capsys.readouterr().out.splitlines() == [" ".join(a.split()) for a in expected]
    file = tmp_path / "q.jsonl"
    file.write_text("".join(json.dumps({"Question": q}) + "\n" for q in QUESTIONS), encoding="utf-8")
    assert cli(["generate", "--model", str(qa_model_dir), "--file", str(file), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"question": q, "answer": a} for q, a in zip(QUESTIONS, expected, strict=True)]


def test_a_model_refuses_the_other_kinds_command(qa_model_dir, tiny_model_dirs, capsys):
    assert cli(["classify", "--model", str(qa_model_dir), "hello"]) == 2
    assert "answers questions in free text" in capsys.readouterr().err
    assert cli(["generate", "--model", str(tiny_model_dirs["onnx"]), "hello"]) == 2
    assert "is a classifier (Sadness, Joy, Fear, Surprise): use `slmkit classify`" in capsys.readouterr().err


def test_the_openai_client_streams_the_answer_slmkit_generate_writes_and_needs_the_key(qa_clf):
    key = "qa-key-0123456789"
    settings = ServeSettings(max_phrases=8, max_chars=120, max_tokens=32, api_key=key)
    with Server(create_app(qa_clf, settings, "qa")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        for question, answer in zip(QUESTIONS, qa_clf.generate(QUESTIONS), strict=True):
            messages = [{"role": "user", "content": question}]
            whole = client.chat.completions.create(model="qa", messages=messages, max_tokens=10)
            assert whole.choices[0].message.content.strip() == answer
            stream = client.chat.completions.create(model="qa", messages=messages, max_tokens=10, stream=True)
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            assert "".join(pieces).strip() == answer
        stranger = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            stranger.chat.completions.create(model="qa", messages=[{"role": "user", "content": "hi"}])
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            server.url + "/classify",
            data=json.dumps({"phrases": ["hi"]}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 404
        assert "POST /v1/chat/completions" in err.value.read().decode()


# --- conversations (data=chat) ------------------------------------------------------------------------


@pytest.fixture
def chat_cfg():
    return compose(["data=chat"])


def conv(*turns, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def test_conversations_are_read_with_their_turns_and_system_message(tmp_path, chat_cfg):
    path = write(tmp_path, [conv("Hi?", "Hello.", "Who?", "Ana", system="Be brief."), conv("Q?", "A")])
    examples, repeats = read_examples(path, chat_cfg.data)
    first, second = examples
    assert (first.text, first.label, first.history, first.system) == ("Who?", "Ana", (("Hi?", "Hello."),), "Be brief.")
    assert (second.text, second.label, second.history, second.system) == ("Q?", "A", (), None)
    assert first.messages() == conv("Hi?", "Hello.", "Who?", "Ana", system="Be brief.")["messages"]
    assert repeats == 0


@pytest.mark.parametrize(
    ("row", "says"),
    [
        (conv("Hi?", "Hello.", "Who?"), r":1: the conversation must end with an assistant message"),
        (conv("Hi?"), r":1: the conversation must end with an assistant message"),
        ({"messages": []}, r":1: 'messages' is empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r":1: messages\[0\]: unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": ""}]}, r":1: messages\[0\]: 'content' is empty"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, r"messages\[0\]: 'content' must be a string, got list"),
        (
            {"messages": [{"role": "assistant", "content": "A"}]},
            r"messages\[0\]: the assistant's message where the user's turn is due",
        ),
        (
            {"messages": [*conv("Q?", "A")["messages"], {"role": "system", "content": "late"}]},
            r"messages\[2\]: a system message comes first",
        ),
        ({"text": "Q?"}, r":1: expected one conversation"),
        (conv("x" * 500, "A"), r"messages\[0\]: 500 characters, over data.max_chars=400"),
    ],
)
def test_bad_conversations_name_the_line_and_the_message(tmp_path, chat_cfg, row, says):
    with pytest.raises(DataError, match=says):
        read_examples(write(tmp_path, [row]), chat_cfg.data)


def test_a_conversations_split_round_trips_and_trains_every_assistant_turn(tmp_path, chat_cfg):
    from slmkit.data import read_split, write_split
    from slmkit.olive_config import render_split

    path = write(tmp_path, [conv("Hi?", "Hello.", "Who?", "Ana", system="Be brief.")])
    examples, _ = read_examples(path, chat_cfg.data)
    write_split(tmp_path / "split.jsonl", examples, chat=True)
    assert [e.messages() for e in read_split(tmp_path / "split.jsonl")] == [examples[0].messages()]
    render_split(chat_cfg.data, examples, "<EOS>", tmp_path / "text.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "text.jsonl").read_text().splitlines()]
    turn = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    assert rows == [
        {"prompt": turn.format("Be brief.\n\nHi?"), "completion": "Hello.<|im_end|><EOS>"},
        {
            "prompt": turn.format("Be brief.\n\nHi?") + "Hello.<|im_end|>\n" + turn.format("Who?"),
            "completion": "Ana<|im_end|><EOS>",
        },
    ]


def test_a_chat_model_answers_a_conversation_with_its_earlier_turns(qa_model_dir, tmp_path):
    from slmkit.prompt import build_conversation_prompt

    folder = tmp_path / "chat_model"
    shutil.copytree(qa_model_dir, folder)
    data = load_prompt_config(folder)
    data.format = "chat"
    save_prompt_config(data, folder)
    clf = load(folder, batch_size=4, threads=1)
    messages = conv("Where is the key?", "drawer", "How many cats does Ana have?", system="Be brief.")["messages"]
    prompt = build_conversation_prompt(
        clf.data, messages[3]["content"], [(messages[1]["content"], "drawer")], "Be brief."
    )
    expected = clf.model.generate(prompt, 10, stop="<|end|>").split("<|end|>")[0].strip()
    assert clf.generate([messages]) == [expected]
    key = "chat-key-0123456789"
    with Server(create_app(clf, ServeSettings(max_tokens=32, api_key=key), "chat")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=10)
        assert reply.choices[0].message.content.strip() == expected
        with pytest.raises(openai.BadRequestError, match=r"messages\[2\] is a user message where the assistant's"):
            client.chat.completions.create(model="chat", messages=[*messages[:2], *messages[3:]])
