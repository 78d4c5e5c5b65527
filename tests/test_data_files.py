"""Data files as spreadsheets, editors and shells write them: every reader of a user's file (training and eval data,
``moorize data check``, ``--input`` of run/generate, moorize's own JSON) decodes through ``io/textfiles.py``.

Each file is written with the bytes its tool produces (byte-order marks, UTF-16, CRLF or CR, Windows-1252, a
workbook), then read through the public functions and the CLI: it reads as the user sees it, or fails in one line
naming file:line:column and what to change.
"""

from __future__ import annotations

import codecs
import json
import random
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from moorize.cli import cli
from moorize.cli.inputs import read_jsonl_inputs
from moorize.errors import MoorizeError
from moorize.io import textfiles
from moorize.io.jsonfiles import json_records, read_versioned_json
from moorize.training.data import read_examples

BOM8, BOM16LE, BOM16BE = codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE
ROWS = [("add", "2+3=", "5"), ("rev", "caf\u00e9 \u201cquoted\u201d", "\u00e9fac"), ("add", "10+7=", "17")]
CSV_TEXT = "task,prompt,response\r\n" + "".join(f"{t},{p},{r}\r\n" for t, p, r in ROWS)  # what Excel writes


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def triples(path) -> list[tuple]:
    return [(e.task, e.prompt, e.response) for e in read_examples(path)]


def data_check(*args: str):
    return CliRunner().invoke(cli, ["data", "check", *args])


def one_line_error(res, *phrases: str) -> str:
    """Exit 2, a single 'error: ...' line holding every phrase, no traceback."""
    both = f"--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}"
    assert res.exit_code == 2 and "Traceback" not in res.stdout + res.stderr, both
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), both
    for p in phrases:
        assert p in lines[0], f"{p!r} not in {lines[0]!r}"
    return lines[0]


# ---- 1, 2. byte-order marks: UTF-8 (Excel "CSV UTF-8", Notepad), UTF-16 LE/BE (Excel "Unicode Text", PowerShell) --

@pytest.mark.parametrize("name, data", [
    ("excel-utf8.csv", BOM8 + CSV_TEXT.encode()),
    ("utf16le.csv", BOM16LE + CSV_TEXT.encode("utf-16-le")),
    ("utf16be.csv", BOM16BE + CSV_TEXT.encode("utf-16-be")),
    ("utf32le.csv", codecs.BOM_UTF32_LE + CSV_TEXT.encode("utf-32-le")),
    ("excel-unicode-text.txt", BOM16LE + CSV_TEXT.replace(",", "\t").encode("utf-16-le")),  # Excel's tab-separated
    ("notepad.jsonl", BOM8 + "".join(json.dumps({"task": t, "prompt": p, "response": r}, ensure_ascii=False) + "\r\n"
                                     for t, p, r in ROWS).encode()),
    ("powershell.jsonl", BOM16LE + "".join(json.dumps({"task": t, "prompt": p, "response": r}) + "\r\n"
                                           for t, p, r in ROWS).encode("utf-16-le")),
])
def test_byte_order_marks_read_and_are_no_part_of_the_first_field(tmp_path, name, data):
    path = write(tmp_path / name, data)
    assert triples(path) == ROWS  # the first column is "task", not "\ufefftask"
    first_line = 2 if path.suffix in (".csv", ".txt") else 1
    assert [e.where for e in read_examples(path)] == [f"{path}:{first_line + n}" for n in range(3)]
    res = data_check(str(path))
    assert res.exit_code == 0 and "3 examples" in res.stdout, res.output


def test_a_file_holding_only_a_byte_order_mark_is_empty(tmp_path):
    for name, bom in (("a.jsonl", BOM8), ("b.csv", BOM16LE)):
        with pytest.raises(MoorizeError, match=f"{name} has no examples"):
            read_examples(write(tmp_path / name, bom))


# ---- 3. line ends: CRLF, lone CR (old Mac), mixed; separators inside JSON strings are not line ends ---------------

@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r", "mixed"])
def test_every_line_ending_reads_and_keeps_line_numbers(tmp_path, ending):
    ends = ["\r\n", "\r", "\n"] if ending == "mixed" else [ending] * 3
    lines = ["task,prompt,response", 'add,"two\nlines",x', "add,1+1=,2", "add,,3"]
    text = "".join(line.replace("\n", e) + e for line, e in zip(lines, ends + ["\n"]))
    path = write(tmp_path / "d.csv", text.encode())
    with pytest.raises(MoorizeError, match=r"d.csv:5: missing field 'prompt'"):  # row 2 spans lines 2-3
        read_examples(path)
    write(path, text.rsplit("add,,3", 1)[0].encode())
    assert triples(path) == [("add", "two\nlines", "x"), ("add", "1+1=", "2")]  # the quoted line end is \n too
    jsonl = write(tmp_path / "d.jsonl", "".join(json.dumps({"task": "t", "prompt": str(i), "response": "r"}) + e
                                                for i, e in enumerate(ends)).encode() + b'{"task": "t"}')
    with pytest.raises(MoorizeError, match=r"d.jsonl:4: needs either"):
        read_examples(jsonl)


def test_unicode_line_separators_stay_inside_a_jsonl_string(tmp_path):
    """str.splitlines would cut these records apart: U+2028, U+2029, \\x0b, \\x0c, \\x1c, \\x85 are data here."""
    odd = "a\u2028b\u2029c\x0bd\x0ce\x1cf\x85g"
    text = json.dumps({"task": "t", "prompt": odd, "response": odd}, ensure_ascii=False) + "\n"
    path = write(tmp_path / "odd.jsonl", (text + text.replace('"t"', '"u"') + '{"task": 1}\n').encode())
    with pytest.raises(MoorizeError, match=r"odd.jsonl:3: needs either"):  # the line count is not thrown off
        read_examples(path)
    write(path, (text * 2).encode())
    assert [e.prompt for e in read_examples(path)] == [odd, odd]


def test_a_raw_tab_inside_a_jsonl_string_reads_as_typed(tmp_path):
    path = write(tmp_path / "tab.jsonl", b'{"task": "t", "prompt": "a\tb", "response": "c"}\n')
    assert triples(path) == [("t", "a\tb", "c")]


def test_decoding_is_the_same_whatever_the_chunk_boundaries(tmp_path, monkeypatch):
    """CRLF, multi-byte characters and UTF-16 pairs cut across chunks: the same text, the same line numbers."""
    rng = random.Random(0)
    pieces = ["a", "é", "\u201c", "😀", ",", '"', "\r\n", "\r", "\n", "\u2028", " "]
    text = "".join(rng.choice(pieces) for _ in range(3000))
    want = text.replace("\r\n", "\n").replace("\r", "\n")
    for codec, bom in (("utf-8", b""), ("utf-8", BOM8), ("utf-16-le", BOM16LE), ("utf-16-be", BOM16BE)):
        path = write(tmp_path / "t.txt", bom + text.encode(codec))
        for chunk in (1, 2, 3, 7, 64):
            monkeypatch.setattr(textfiles, "CHUNK_BYTES", chunk)
            assert "".join(textfiles.text_chunks(path)) == want
            assert list(textfiles.text_lines(path)) == [line + "\n" for line in want.split("\n")[:-1]] + \
                ([want.rsplit("\n", 1)[-1]] if not want.endswith("\n") else [])


# ---- 4. not UTF-8 and no byte-order mark: one line naming the place, the byte, the likely encoding, the fix ---------

def test_windows_1252_smart_quotes_are_named_with_the_fix(tmp_path):
    path = write(tmp_path / "sheet.csv", "task,text,label\r\nt,fine,a\r\nt,\u201cquoted\u201d,b\r\n".encode("cp1252"))
    line = one_line_error(data_check(str(path)), f"{path}:3:3: byte 0x93 is not UTF-8", "Windows-1252",
                          "'\u201c'", "Save As > 'CSV UTF-8'", "iconv -f cp1252 -t utf-8 sheet.csv")
    assert line.count(str(path)) == 1


def test_latin1_is_named_in_jsonl_and_in_run_inputs(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(MoorizeError, match=r"in.jsonl:2:16: byte 0xe9 is not UTF-8; the file looks like "
                                           r"Windows-1252 or Latin-1 \(where 0xe9 is 'é'\)"):
        read_jsonl_inputs(path)
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "no-export"), "--input", str(path)])
    one_line_error(res, "in.jsonl:2:16: byte 0xe9 is not UTF-8")


def test_a_utf8_file_cut_inside_a_character_says_so(tmp_path):
    path = write(tmp_path / "cut.jsonl", '{"task": "t", "prompt": "\u201c'.encode()[:-1])
    with pytest.raises(MoorizeError, match="cut.jsonl:1:26: the file ends inside a UTF-8 character"):
        read_examples(path)


def test_utf16_without_a_byte_order_mark_is_refused_with_the_fix(tmp_path):
    path = write(tmp_path / "nobom.csv", CSV_TEXT.encode("utf-16-le"))
    one_line_error(data_check(str(path)), "nobom.csv looks like UTF-16 text without a byte-order mark",
                   "re-save it as UTF-8")


def test_broken_utf16_names_the_place(tmp_path):
    path = write(tmp_path / "bad16.jsonl", BOM16LE + '{"task"\n'.encode("utf-16-le") + b"\x00\xd8x\x00")
    with pytest.raises(MoorizeError, match=r"bad16.jsonl:2:1: bytes 00 d8 are not valid UTF-16"):
        read_examples(path)


# ---- 5. tab- and semicolon-separated tables -----------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [
    ("data.tsv", "task\tprompt\tresponse\nadd\t2+3=\t5\nrev\ta,b\tb,a\n"),
    ("tabs.csv", "task\tprompt\tresponse\nadd\t2+3=\t5\nrev\ta,b\tb,a\n"),  # a .csv that Excel saved tab-separated
    ("semicolons.csv", "task;prompt;response\r\nadd;2+3=;5\r\nrev;a,b;b,a\r\n"),  # Excel where "," is the decimal
    ("spaced.csv", "task, prompt, response\nadd,2+3=,5\nrev,\"a,b\",\"b,a\"\n"),  # header names are trimmed
    ("table.txt", "task\tprompt\tresponse\nadd\t2+3=\t5\nrev\ta,b\tb,a\n"),
])
def test_tables_by_suffix_and_header(tmp_path, name, text):
    assert triples(write(tmp_path / name, text.encode())) == [("add", "2+3=", "5"), ("rev", "a,b", "b,a")]


def test_a_txt_holding_jsonl_is_jsonl(tmp_path):
    path = write(tmp_path / "rows.txt", b'{"task": "t", "prompt": "a\\tb,c", "response": "d"}\n')
    assert triples(path) == [("t", "a\tb,c", "d")]


# ---- 6. a .json file holding one array of records ------------------------------------------------------------------

RECORDS = [{"task": t, "prompt": p, "response": r} for t, p, r in ROWS]


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_reads_item_by_item(tmp_path, indent):
    path = write(tmp_path / "export.json", json.dumps(RECORDS, indent=indent, ensure_ascii=False).encode())
    assert triples(path) == ROWS
    res = data_check(str(path))
    assert res.exit_code == 0 and "3 examples" in res.stdout, res.output
    assert [w for w, _ in json_records(path)][2] == f"{path}[2] (line {12 if indent else 1})"


def test_json_array_errors_name_the_item_and_line(tmp_path):
    bad = [*RECORDS[:2], {"task": "add", "prompt": "x"}]
    path = write(tmp_path / "a.json", BOM8 + json.dumps(bad, indent=2).encode().replace(b"\n", b"\r\n"))
    one_line_error(data_check(str(path)), f"{path}[2] (line 12): missing field 'response'")
    write(path, b'[\n {"task": "t", "prompt": "a", "response": "b"},\n {"task": "t", "prompt": "a",}\n]')
    with pytest.raises(MoorizeError, match=r"a.json:3: invalid JSON \(Expecting property name.*\) in item 1"):
        read_examples(path)
    write(path, b'[{"task": "t", "prompt": "a", "response": "b"}\n{"task": "t"}]')
    with pytest.raises(MoorizeError, match=r"a.json:2: invalid JSON \(the array is not closed: '\{' follows"):
        read_examples(path)
    write(path, b'[{"task": "t", "prompt": "a", "response": "b"}] []')
    with pytest.raises(MoorizeError, match=r"a.json:1: invalid JSON \(text after the array's closing"):
        read_examples(path)
    with pytest.raises(MoorizeError, match="a.json has no examples"):
        read_examples(write(path, b"[ ]\n"))


def test_a_json_array_in_a_jsonl_file_gets_a_hint(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps(RECORDS, indent=2).encode())
    with pytest.raises(MoorizeError, match=r"a.jsonl:1: invalid JSON .*must be named .json"):
        read_examples(path)


def test_run_inputs_read_a_json_array_and_utf16(tmp_path):
    rows = [{"prompt": "caf\u00e9", "task": "a"}, {"text": "x\u2028y"}]
    arr = write(tmp_path / "in.json", json.dumps(rows).encode())
    ps = write(tmp_path / "in.jsonl", BOM16LE + "".join(json.dumps(r) + "\r\n" for r in rows).encode("utf-16-le"))
    for path in (arr, ps):
        assert read_jsonl_inputs(path) == [{"text": "caf\u00e9", "task": "a"}, {"text": "x\u2028y", "task": None}]
        res = CliRunner().invoke(cli, ["run", str(tmp_path / "no-export"), "--input", str(path)])
        assert "no-export" in one_line_error(res)  # the inputs read; the export is what is missing


# ---- 7. binary files and NUL bytes ----------------------------------------------------------------------------------

def _xlsx(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:  # the start of a real workbook: a zip of XML parts
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr("xl/workbook.xml", "<workbook/>")
    return path


@pytest.mark.parametrize("name, make, what", [
    ("data.xlsx", _xlsx, "an Excel workbook .xlsx"),
    ("data.csv", _xlsx, "an Excel workbook .xlsx"),  # a workbook renamed to .csv
    ("data.xls", lambda p: write(p, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)), "an Excel 97-2003 workbook .xls"),
    ("data.parquet", lambda p: write(p, b"PAR1\x15\x04\x15\x10\x15\x14L" + bytes(20) + b"PAR1"), "a Parquet file"),
    ("data.jsonl.gz", lambda p: write(p, b"\x1f\x8b\x08\x00" + bytes(16)), "a gzip-compressed file"),
    ("data.bin", lambda p: write(p, b"task,prompt\n\x00\x01\x02\x03"), "a NUL byte on line 2"),
])
def test_binary_files_are_named_in_one_line(tmp_path, name, make, what):
    path = make(tmp_path / name)
    one_line_error(data_check(str(path)), f"{path} looks like a binary file ({what}", "save it as CSV UTF-8 or JSONL")


def test_a_nul_byte_past_the_start_names_its_place(tmp_path):
    record = b'{"task": "t", "prompt": "a", "response": "b"}\n'  # 100 of them: the NUL lies past the sniffed head
    path = write(tmp_path / "late.jsonl", record * 100 + b'{"task":\x00}\n')
    with pytest.raises(MoorizeError, match=r"late.jsonl:101:9: a NUL byte: the file looks binary"):
        read_examples(path)


# ---- 8. empty files, blank lines, header-only tables ------------------------------------------------------------------

@pytest.mark.parametrize("name, data, message", [
    ("empty.csv", b"", "empty.csv has no examples"),
    ("empty.jsonl", b"", "empty.jsonl has no examples"),
    ("blank.jsonl", b"\r\n  \r\n\t\n", "blank.jsonl has no examples"),
    ("header.csv", BOM8 + b"task,prompt,response\r\n\r\n", "header.csv has a header line (task, prompt, response) "
                                                              "but no examples under it"),
    ("commas.csv", b"task,prompt,response\r\n,,\r\n, ,\r\n", "commas.csv has a header line"),
])
def test_empty_files_say_so(tmp_path, name, data, message):
    one_line_error(data_check(str(write(tmp_path / name, data))), message)


def test_blank_lines_and_empty_rows_are_skipped(tmp_path):
    jsonl = write(tmp_path / "a.jsonl", b'\r\n{"task": "t", "prompt": "a", "response": "b"}\r\n   \r\n\t\r\n\r\n'
                                        b'{"task": "t", "prompt": "c", "response": "d"}\r\n\r\n\r\n')
    assert [e.where for e in read_examples(jsonl)] == [f"{jsonl}:2", f"{jsonl}:6"]
    table = write(tmp_path / "a.csv", b"\r\n\r\ntask,prompt,response\r\nt,a,b\r\n,,\r\n\r\nt,c,d\r\n,,\r\n,,\r\n")
    assert [e.where for e in read_examples(table)] == [f"{table}:4", f"{table}:7"]


# ---- 9. the bound on one record stays: no line or item over MAX_RECORD_CHARS is held ----------------------------------

def test_a_json_array_item_over_the_bound_is_refused_and_many_small_ones_read(tmp_path, monkeypatch):
    monkeypatch.setattr(textfiles, "MAX_RECORD_CHARS", 1 << 16)
    small = [{"task": "t", "prompt": f"p{i}", "response": "r" * 50} for i in range(2000)]  # 150 KB on one line
    path = write(tmp_path / "many.json", json.dumps(small).encode())
    assert len(read_examples(path)) == 2000
    big = [small[0], {"task": "t", "prompt": "x" * (1 << 17), "response": "r"}]
    with pytest.raises(MoorizeError, match=r"big.json:1: item 1 is longer than"):
        read_examples(write(tmp_path / "big.json", json.dumps(big).encode()))
    with pytest.raises(MoorizeError, match=r"big.jsonl:2: line longer than"):
        read_examples(write(tmp_path / "big.jsonl", b"\n".join(json.dumps(r).encode() for r in big)))


# ---- moorize's own JSON, edited by a user: a byte-order mark and CRLF do not break it; still strict ------------------

def test_versioned_json_tolerates_a_bom_and_crlf_but_stays_strict(tmp_path):
    meta = {"format": "moorize-factored", "format_version": 1, "layers": {}}
    path = write(tmp_path / "moorize.json", BOM8 + json.dumps(meta, indent=1).encode().replace(b"\n", b"\r\n"))
    assert read_versioned_json(path, "moorize-factored", 1, "moorize manifest") == meta
    write(path, BOM16LE + json.dumps(meta).encode("utf-16-le"))
    assert read_versioned_json(path, "moorize-factored", 1, "moorize manifest") == meta
    write(path, json.dumps({**meta, "note": "caf\u00e9"}, ensure_ascii=False).encode("cp1252"))
    with pytest.raises(MoorizeError, match=r"moorize.json:1:\d+: byte 0xe9 is not UTF-8"):
        read_versioned_json(path, "moorize-factored", 1, "moorize manifest")
    write(path, b'{"format": "moorize-factored", "format_version": 1,}')
    with pytest.raises(MoorizeError, match="moorize.json is unreadable"):
        read_versioned_json(path, "moorize-factored", 1, "moorize manifest")


# ---- moorize train reads what data check reads ----------------------------------------------------------------------

def test_train_reads_an_excel_unicode_text_file(tmp_path_factory, tmp_path):
    from test_train import factored_tiny, toy_causal

    factored = factored_tiny(tmp_path_factory.mktemp("files-llama"), "llama")
    rows = toy_causal(4)
    text = "task\tprompt\tresponse\r\n" + "".join(f"{r['task']}\t{r['prompt']}\t{r['response']}\r\n" for r in rows)
    data = write(tmp_path / "export.txt", BOM16LE + text.encode("utf-16-le"))
    res = CliRunner().invoke(cli, ["train", str(factored), "--data", str(data), "--output", str(tmp_path / "out"),
                                   "--max-steps", "1", "--batch-size", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    bad = write(tmp_path / "bad.csv", text.replace("\t", ",").encode("cp1252").replace(b"=", b"\x96"))
    res = CliRunner().invoke(cli, ["train", str(factored), "--data", str(bad), "--output", str(tmp_path / "out2"),
                                   "--max-steps", "1"])
    one_line_error(res, f"{bad}:2:", "byte 0x96 is not UTF-8", "Windows-1252")
    assert not (tmp_path / "out2").exists()
