"""The benchmark readers (eval/formats.py) and YAML tasks (eval/custom.py) against hand-written fixtures.

The fixtures in tests/fixtures/eval/ are rows in each benchmark's published Hugging Face schema;
the expected contexts and continuations below are written out by hand, as lm-evaluation-harness
frames them.
"""

import json
import re
import sys
from pathlib import Path

import pytest

from binarylm.errors import BinaryLMError
from binarylm.eval.custom import load_custom_task
from binarylm.eval.formats import BENCHMARKS, MMLU_HEADER, read_benchmark, read_rows
from binarylm.eval.items import ChoiceItem, GenerationItem

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def fixture_items(name: str) -> list:
    return read_benchmark(name, FIXTURES / f"{name}.jsonl")


def contexts(item: ChoiceItem) -> list[str]:
    return [context for context, _ in item.options]


def continuations(item: ChoiceItem) -> list[str]:
    return [continuation for _, continuation in item.options]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# What each benchmark's rows become


def test_hellaswag_joins_label_and_scene_and_cleans_wikihow_markup():
    first, wikihow, short = fixture_items("hellaswag")
    scene = "Baking cookies: A woman stands at a kitchen counter with a bowl of dough. She"
    assert contexts(first) == [scene] * 4
    assert continuations(first) == [" rolls the dough into small balls and sets them on a tray.",
                                    " throws the bowl out of the open window.",
                                    " sings into a microphone on a stage.",
                                    " paints the counter a bright green."]
    assert first.gold == 0  # label "0", a string as in the published data
    assert first.few_shot_text == scene + " rolls the dough into small balls and sets them on a tray."
    assert contexts(wikihow)[0] == "Home and Garden: How to water a cactus. Check the soil first. " \
                                   "Push a finger into the soil."
    assert continuations(wikihow)[1] == " If it feels dry, water slowly. Let the water drain."
    assert wikihow.gold == 1  # label 1, an int
    assert contexts(short)[0] == "Playing fetch: A dog runs across a park with a ball in its mouth. The dog"
    assert len(short.options) == 3
    assert first.source.endswith("hellaswag.jsonl, line 1") and short.source.endswith("hellaswag.jsonl, line 3")


def test_hellaswag_reads_a_bare_ctx_when_the_split_fields_are_absent(tmp_path):
    record = {"activity_label": "Skiing", "ctx": "A man skis down a hill.", "endings": [" He falls.", "He waves."],
              "label": "1"}
    [item] = read_benchmark("hellaswag", write_jsonl(tmp_path / "hs.jsonl", [record]))
    assert item.options == (("Skiing: A man skis down a hill.", " He falls."),
                            ("Skiing: A man skis down a hill.", " He waves."))
    assert item.gold == 1


def test_arc_frames_question_and_answer_and_maps_letter_or_digit_keys():
    letters, digits = fixture_items("arc")
    question = "Question: Which tool is best for measuring the mass of a rock?\nAnswer:"
    assert contexts(letters) == [question] * 4
    assert continuations(letters) == [" a ruler", " a balance", " a thermometer", " a stopwatch"]
    assert letters.gold == 1
    assert letters.few_shot_text == question + " a balance"
    assert continuations(digits) == [" the Moon", " a mirror", " the Sun"]
    assert digits.gold == 2  # answerKey "3" among labels "1", "2", "3"


def test_mmlu_letters_the_choices_under_the_subject_header():
    arithmetic, biology = fixture_items("mmlu")
    body = "What is 7 times 6?\nA. 36\nB. 42\nC. 48\nD. 56\nAnswer:"
    header = "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    assert contexts(arithmetic) == [body] * 4 and arithmetic.preamble == header  # said once, before any examples
    assert continuations(arithmetic) == [" A", " B", " C", " D"]
    assert arithmetic.gold == 1
    assert arithmetic.few_shot_text == body + " B"  # a solved example goes without the header
    assert biology.preamble == MMLU_HEADER.format(subject="high school biology")
    assert contexts(biology)[0] == (
        "Which part of a plant cell carries out photosynthesis?\n"  # the question's trailing space is trimmed
        "A. the nucleus\nB. the cell wall\nC. the chloroplast\nD. the vacuole\nAnswer:"
    )
    assert biology.gold == 2


def test_piqa_offers_the_two_solutions_as_answers():
    bread, jar = fixture_items("piqa")
    assert bread.options == (
        ("Question: To keep bread fresh for longer,\nAnswer:", " store it in a sealed bag at room temperature."),
        ("Question: To keep bread fresh for longer,\nAnswer:", " leave it unwrapped next to the oven."),
    )
    assert bread.gold == 0 and jar.gold == 1
    assert jar.few_shot_text == "Question: Loosen a stuck jar lid.\nAnswer: Run the lid under hot water for a " \
                                "minute, then twist."


def test_winogrande_fills_the_blank_in_the_context_and_shares_the_rest():
    umbrella, bikes = fixture_items("winogrande")
    assert umbrella.options == (
        ("Maria lent her umbrella to Jessica because Maria", " was going out into the rain."),
        ("Maria lent her umbrella to Jessica because Jessica", " was going out into the rain."),
    )
    assert umbrella.gold == 1  # answer "2"
    assert umbrella.few_shot_text == "Maria lent her umbrella to Jessica because Jessica was going out into the rain."
    assert bikes.options == (
        ("Tom's bike was faster than Sam's, so Tom", "'s ride home took less time."),
        ("Tom's bike was faster than Sam's, so Sam", "'s ride home took less time."),
    )
    assert bikes.gold == 0


def test_gsm8k_asks_for_the_number_after_the_four_hashes():
    rolls, houses = fixture_items("gsm8k")
    assert isinstance(rolls, GenerationItem)
    assert rolls.prompt == "Question: A baker makes 12 rolls an hour for 5 hours. She sells 45 of them. " \
                           "How many rolls are left?\nAnswer:"
    assert rolls.answer == "15"
    assert rolls.stop == ("\n\n", "Question:")
    assert rolls.few_shot_text == rolls.prompt + " She makes 12 * 5 = <<12*5=60>>60 rolls.\n" \
                                                 "She has 60 - 45 = <<60-45=15>>15 rolls left.\n#### 15"
    assert houses.answer == "1550"  # "#### 1,550" without its comma


def test_benchmark_names_are_forgiving_about_case_and_dashes():
    assert read_benchmark("ARC-Easy", FIXTURES / "arc.jsonl") == fixture_items("arc")
    assert BENCHMARKS["arc_challenge"] is BENCHMARKS["arc"]


# ---------------------------------------------------------------------------------------------
# Files: JSONL, a JSON list, parquet


def test_a_json_list_file_reads_like_jsonl_with_item_numbers(tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "piqa.jsonl").read_text().splitlines()]
    (tmp_path / "piqa.json").write_text(json.dumps(records, indent=1))
    items = read_benchmark("piqa", tmp_path / "piqa.json")
    assert [item.source for item in items] == [f"{tmp_path / 'piqa.json'}, item {n}" for n in (1, 2)]
    assert [item.options for item in items] == [item.options for item in fixture_items("piqa")]


def test_parquet_rows_give_the_same_items_with_row_numbers(tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet")
    pyarrow = pytest.importorskip("pyarrow")
    records = [record for _, record in read_rows(FIXTURES / "arc.jsonl")]
    parquet.write_table(pyarrow.Table.from_pylist(records), tmp_path / "arc.parquet")  # choices: a struct of lists
    items = read_benchmark("arc", tmp_path / "arc.parquet")
    assert [item.source for item in items] == [f"{tmp_path / 'arc.parquet'}, row {n}" for n in (1, 2)]
    expected = fixture_items("arc")
    assert [(item.options, item.gold, item.few_shot_text) for item in items] == \
           [(item.options, item.gold, item.few_shot_text) for item in expected]


def test_parquet_without_pyarrow_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(BinaryLMError, match=re.escape("pip install 'binarylm[eval]'")):
        read_rows(tmp_path / "arc.parquet")


def test_a_damaged_parquet_file_is_named(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "arc.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BinaryLMError, match=r"arc\.parquet: not a readable parquet file"):
        read_benchmark("arc", tmp_path / "arc.parquet")


# ---------------------------------------------------------------------------------------------
# Bad benchmark input: one message naming the file, the line and the fields

GOOD = {
    "hellaswag": {"activity_label": "A", "ctx_a": "B.", "ctx_b": "c", "endings": ["d", "e"], "label": "0"},
    "arc": {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"},
    "mmlu": {"question": "Q?", "subject": "s", "choices": ["1", "2", "3", "4"], "answer": 0},
    "piqa": {"goal": "G", "sol1": "x", "sol2": "y", "label": 0},
    "winogrande": {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"},
    "gsm8k": {"question": "Q?", "answer": "so\n#### 3"},
}

BAD_RECORDS = [
    ("arc", {"answerKey": None}, r"missing field 'answerKey'; an ARC record has question, choices \{text, label\}, "
                                 r"answerKey"),
    ("arc", {"choices": {"text": "x y", "label": ["A", "B"]}}, r"field 'choices.text' should be a list of strings, "
                                                                r"got str 'x y'"),
    ("arc", {"choices": ["x", "y"]}, r"field 'choices' should be an object, got list"),
    ("arc", {"answerKey": "E"}, r"answerKey 'E' is not one of the labels \['A', 'B'\]"),
    ("hellaswag", {"endings": "d"}, r"field 'endings' should be a list of strings.*a HellaSwag record has "
                                    r"activity_label, ctx_a and ctx_b \(or ctx\), endings, label"),
    ("hellaswag", {"label": ""}, r"field 'label' is empty \(test splits are unlabelled; use the validation split\)"),
    ("hellaswag", {"label": 4}, r"field 'label' is 4, out of range: there are 2 choices, numbered 0 to 1"),
    ("hellaswag", {"ctx_a": None, "ctx_b": None}, r"missing field 'ctx'"),
    ("mmlu", {"answer": 4}, r"field 'answer' is 4, out of range.*an MMLU record has question, subject, choices"),
    ("mmlu", {"answer": True}, r"field 'answer' should be an integer or a string of digits, got bool"),
    ("mmlu", {"choices": None}, r"missing field 'choices'"),
    ("piqa", {"label": -1}, r"field 'label' is -1, out of range.*a PIQA record has goal, sol1, sol2, label"),
    ("piqa", {"sol2": 7}, r"field 'sol2' should be a string, got int 7"),
    ("winogrande", {"sentence": "A blank-less sentence."}, r"field 'sentence' has no blank '_'.*a Winogrande record "
                                                           r"has sentence \(with one '_'\), option1, option2, answer"),
    ("winogrande", {"answer": "3"}, r"field 'answer' is 3, out of range: there are 2 choices, numbered 1 to 2"),
    ("gsm8k", {"answer": "just 3"}, r"field 'answer' has no final line '#### N'.*a GSM8K record has question, answer"),
    ("gsm8k", {"question": None}, r"missing field 'question'"),
]


@pytest.mark.parametrize(("benchmark", "change", "message"), BAD_RECORDS)
def test_a_bad_record_is_named_by_file_line_and_fields(tmp_path, benchmark, change, message):
    bad = {key: value for key, value in {**GOOD[benchmark], **change}.items() if value is not None}
    path = write_jsonl(tmp_path / f"{benchmark}.jsonl", [GOOD[benchmark], bad])
    with pytest.raises(BinaryLMError, match=re.escape(f"{benchmark}.jsonl, line 2: ") + message):
        read_benchmark(benchmark, path)


def test_the_good_records_of_the_bad_record_test_are_good(tmp_path):
    for name, record in GOOD.items():  # else the test above could pass for the wrong reason
        assert len(read_benchmark(name, write_jsonl(tmp_path / f"{name}.jsonl", [record]))) == 1


def test_an_empty_file_is_an_error(tmp_path):
    (tmp_path / "piqa.jsonl").write_text("\n")
    with pytest.raises(BinaryLMError, match=r"piqa\.jsonl: no records; expected PIQA \(goal, sol1, sol2"):
        read_benchmark("piqa", tmp_path / "piqa.jsonl")


def test_malformed_json_names_the_line(tmp_path):
    (tmp_path / "arc.jsonl").write_text(json.dumps(GOOD["arc"]) + "\n{'question': 1}\n")
    with pytest.raises(BinaryLMError, match=r"arc\.jsonl, line 2: malformed JSON"):
        read_benchmark("arc", tmp_path / "arc.jsonl")


def test_missing_files_and_unknown_suffixes_are_named(tmp_path):
    with pytest.raises(BinaryLMError, match=r"nowhere\.jsonl is not a file"):
        read_benchmark("arc", tmp_path / "nowhere.jsonl")
    (tmp_path / "arc.csv").write_text("question,answerKey\n")
    with pytest.raises(BinaryLMError, match=r"arc\.csv: cannot read '\.csv' files; give a \.jsonl, \.json or "):
        read_benchmark("arc", tmp_path / "arc.csv")


def test_an_unknown_benchmark_lists_the_known_ones_and_points_to_custom_tasks():
    with pytest.raises(BinaryLMError, match=r"unknown benchmark 'boolq'; known: hellaswag, arc, .*gsm8k\. "
                                            r"For other data, describe the task in a YAML file"):
        read_benchmark("boolq", FIXTURES / "arc.jsonl")


# ---------------------------------------------------------------------------------------------
# Custom YAML tasks


def test_a_multiple_choice_yaml_task():
    task = load_custom_task(FIXTURES / "capitals.yaml")
    assert (task.name, task.kind, task.few_shot) == ("capitals", "multiple_choice", 1)
    assert (task.metric, task.regex, task.max_new_tokens) == (None, None, None)
    france, japan, canada = task.items
    assert france.options == (("Q: What is the capital of France?\nA:", " Lyon"),
                              ("Q: What is the capital of France?\nA:", " Paris"),
                              ("Q: What is the capital of France?\nA:", " Nice"))
    assert france.gold == 1  # label 1: an index
    assert japan.gold == 0  # label "Tokyo": the text of a choice
    assert canada.gold == 1  # label "1": no choice reads "1", so an index in digits
    assert france.few_shot_text == "Q: What is the capital of France?\nA: Paris"
    assert france.source == f"{FIXTURES / 'capitals.jsonl'}, line 1"
    assert task.path == FIXTURES / "capitals.yaml"


def test_a_generation_yaml_task():
    task = load_custom_task(FIXTURES / "sums.yaml")
    assert (task.kind, task.metric, task.regex, task.max_new_tokens, task.few_shot) == \
           ("generate", "regex", r"(-?\d+)", 8, 0)
    first, second = task.items
    assert (first.prompt, first.answer, first.stop) == ("Question: What is 2 plus 3?\nAnswer:", "5", ("\n",))
    assert second.prompt == "Question: What is -4 plus 10?\nAnswer:"
    assert second.few_shot_text == "Question: What is -4 plus 10?\nAnswer: 6"


def write_task(folder: Path, yaml_text: str, records: list[dict] | None = None) -> Path:
    write_jsonl(folder / "rows.jsonl", records if records is not None else [{"q": "2+2", "a": "4", "opts": ["3", "4"]},
                                                                            {"q": "1+1", "a": "2", "opts": ["2", "5"]}])
    (folder / "task.yaml").write_text(yaml_text, encoding="utf-8")
    return folder / "task.yaml"


CHOICE_TASK = 'name: t\ndata: rows.jsonl\nkind: multiple_choice\nprompt: "{q} ="\nchoices: "{opts}"\nanswer: "{a}"\n'
GENERATE_TASK = 'name: t\ndata: rows.jsonl\nkind: generate\nprompt: "{q} ="\nanswer: "{a}"\n'


def test_choices_as_a_list_of_templates_and_an_answer_template(tmp_path):
    records = [{"x": "red", "y": "blue", "right": "y"}, {"x": "up", "y": "down", "right": "x"}]
    yaml_text = ('name: t\ndata: rows.jsonl\nkind: multiple_choice\nprompt: "Pick:\\n"\n'
                 'choices: ["{x}", "the {y}"]\nanswer: "the {y}"\n')
    first, second = load_custom_task(write_task(tmp_path, yaml_text, records)).items
    assert first.options == (("Pick:\n", "red"), ("Pick:\n", "the blue"))  # no space after the newline
    assert first.gold == 1 and second.gold == 1


def test_a_generation_task_has_defaults(tmp_path):
    task = load_custom_task(write_task(tmp_path, GENERATE_TASK))
    assert (task.metric, task.regex, task.max_new_tokens, task.few_shot) == ("exact_match", None, 32, 0)
    assert task.items[0].stop == ("\n\n",)
    assert task.items[0].few_shot_text == "2+2 = 4"


BAD_TASKS = [
    (CHOICE_TASK + "shots: 3\n", r"task\.yaml: unknown key 'shots'; the valid keys are name, data, kind, prompt"),
    (CHOICE_TASK.replace('prompt: "{q} ="\n', ""), r"task\.yaml: missing required key 'prompt'; a multiple_choice "
                                                   r"task needs name, data, kind, prompt, answer, choices"),
    (CHOICE_TASK.replace('choices: "{opts}"\n', ""), r"task\.yaml: missing required key 'choices'"),
    (CHOICE_TASK.replace("multiple_choice", "classify"), r"task\.yaml: 'kind' is 'classify'; it should be one of "
                                                         r"multiple_choice, generate"),
    (GENERATE_TASK + "metric: bleu\n", r"task\.yaml: 'metric' is 'bleu'; it should be one of exact_match, regex"),
    (GENERATE_TASK.replace("rows.jsonl", "gone.jsonl") + "metric: bleu\n", r"'metric' is 'bleu'"),  # settings first
    (GENERATE_TASK + 'metric: regex\nregex: "(\\\\d+"\n', r"task\.yaml: 'regex' does not compile"),
    (GENERATE_TASK + 'metric: regex\nregex: "\\\\d+"\n', r"task\.yaml: 'regex' '\\\\d\+' has no group"),
    (GENERATE_TASK + 'regex: "(\\\\d+)"\n', r"task\.yaml: 'regex' is used only with metric: regex"),
    (GENERATE_TASK + 'choices: "{opts}"\n', r"task\.yaml: 'choices' is only for kind: multiple_choice"),
    (CHOICE_TASK + "max_new_tokens: 5\n", r"task\.yaml: 'max_new_tokens' is only for kind: generate"),
    (GENERATE_TASK + "max_new_tokens: 0\n", r"task\.yaml: 'max_new_tokens' is 0; it should be at least 1"),
    (GENERATE_TASK + "few_shot: two\n", r"task\.yaml: 'few_shot' should be a whole number, at least 0, got str"),
    (GENERATE_TASK + "few_shot: 2\n", r"task\.yaml: 'few_shot' is 2, but the data has only 2 records"),
    (GENERATE_TASK + "stop: []\n", r"task\.yaml: 'stop' should hold one or more non-empty strings"),
    (CHOICE_TASK.replace('"{opts}"', '"one of {opts}"'), r"task\.yaml: 'choices' is 'one of \{opts\}'; as a string "
                                                         r"it must be one field in braces"),
    (GENERATE_TASK.replace('"{q} ="', '"{q} = {"'), r"task\.yaml: 'prompt' is not a valid template"),
    (GENERATE_TASK.replace('"{q} ="', '"{0} ="'), r"task\.yaml: 'prompt' uses a positional field '\{0\}'"),
    (CHOICE_TASK.replace("rows.jsonl", "data/missing.jsonl"),
     r"task\.yaml: 'data' names 'data/missing\.jsonl', which is not a file \(looked for .*data/missing\.jsonl;"),
    ("name: t\nkind: [unclosed\n", r"task\.yaml, line 3: malformed YAML"),
    ("- just\n- a list\n", r"task\.yaml: a task file is a YAML mapping of keys"),
]


@pytest.mark.parametrize(("yaml_text", "message"), BAD_TASKS)
def test_a_bad_task_file_names_the_file_and_the_key(tmp_path, yaml_text, message):
    with pytest.raises(BinaryLMError, match=message):
        load_custom_task(write_task(tmp_path, yaml_text))


def test_the_base_tasks_of_the_bad_task_test_are_good(tmp_path):
    assert len(load_custom_task(write_task(tmp_path, CHOICE_TASK)).items) == 2
    assert len(load_custom_task(write_task(tmp_path, GENERATE_TASK)).items) == 2


def test_a_template_field_missing_from_a_row_names_the_data_file_line_and_field(tmp_path):
    records = [{"q": "2+2", "a": "4"}, {"question": "1+1", "a": "2"}]
    with pytest.raises(BinaryLMError, match=r"rows\.jsonl, line 2: this record has no field 'q', which "
                                            r"'prompt: \{q\} =' in .*task\.yaml uses; the record's fields are "
                                            r"question, a"):
        load_custom_task(write_task(tmp_path, GENERATE_TASK, records))


def test_an_answer_that_is_no_choice_names_the_row(tmp_path):
    records = [{"q": "2+2", "a": "4", "opts": ["3", "4"]}, {"q": "1+1", "a": "two", "opts": ["2", "5"]}]
    with pytest.raises(BinaryLMError, match=r"rows\.jsonl, line 2: the answer 'two' .* is neither one of the "
                                            r"choices \['2', '5'\] nor a 0-based index below 2"):
        load_custom_task(write_task(tmp_path, CHOICE_TASK, records))


def test_a_choices_field_that_is_no_list_names_the_row(tmp_path):
    records = [{"q": "2+2", "a": "4", "opts": "3 or 4"}]
    with pytest.raises(BinaryLMError, match=r"rows\.jsonl, line 1: \{opts\} \(the 'choices' of .*task\.yaml\) "
                                            r"should be a list of at least two choices, got str"):
        load_custom_task(write_task(tmp_path, CHOICE_TASK, records))


def test_a_missing_task_file_is_named(tmp_path):
    with pytest.raises(BinaryLMError, match=r"nothing\.yaml is not a file; give a YAML task file"):
        load_custom_task(tmp_path / "nothing.yaml")
