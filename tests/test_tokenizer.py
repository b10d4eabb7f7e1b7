"""examples/glm/tokenizer.py: llama.cpp's own tokenizer test vectors (third_party/llama.cpp/vocab: texts and the ids
llama.cpp's tokenizer gives them, without BOS and without parsing special tokens), GLM-4.7-Flash's chat template, the
streaming decoder, and run.py's prompt and end of generation on the synthetic GLM (its real BPE vocab and template)."""
import json, pathlib, subprocess, sys
import pytest
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.glm import synth  # noqa: E402
from examples.glm.tokenizer import Tokenizer, TokenizerError, StreamDecoder, PRE_TOKENIZERS  # noqa: E402

VOCAB = ROOT / "third_party" / "llama.cpp" / "vocab"

@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_vectors(name):
  path = VOCAB / f"ggml-vocab-{name}.gguf"
  tok = Tokenizer.from_gguf(path)
  texts = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
  wants = path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
  assert len(texts) == 47 and len(wants) >= len(texts)
  for text, want in zip(texts, wants):
    ids = tok.encode(text)
    assert ids == [int(i) for i in want.split()], repr(text)
    assert tok.decode(ids) == text, repr(text)

def test_glm4_splits_digits_in_threes_and_attaches_a_leading_non_letter():
  # GLM-4's pre-tokenizer (llama.cpp: the same regex as llama-bpe), on the llama-bpe vocab
  tok = Tokenizer.from_gguf(VOCAB / "ggml-vocab-llama-bpe.gguf")
  assert PRE_TOKENIZERS["glm4"] == PRE_TOKENIZERS["llama-bpe"]
  assert [tok.decode([i]) for i in tok.encode("abc12345")] == ["abc", "123", "45"]

def test_unknown_pre_tokenizer_or_model_is_one_clear_error():
  kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a"]}
  with pytest.raises(TokenizerError, match="tokenizer.ggml.pre 'mystery' is not supported"): Tokenizer.from_kv(kv)
  with pytest.raises(TokenizerError, match="tokenizer.ggml.model 'llama' is not supported"): Tokenizer.from_kv({**kv, "tokenizer.ggml.model": "llama"})

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
  return synth.write(tmp_path_factory.mktemp("tok") / "tiny.gguf", "tiny", "Q4_0", seed=0)

def test_synthetic_glm_has_glms_template_and_special_tokens(tiny):
  tok = Tokenizer.from_gguf(tiny)
  text = tok.render_chat([{"role": "user", "content": "Hello"}])
  assert text == "[gMASK]<sop><|user|>Hello<|assistant|><think>"
  ids = tok.encode(text, parse_special=True)
  assert [tok.tokens[i] for i in ids[:3]] == ["[gMASK]", "<sop>", "<|user|>"] and tok.tokens[ids[-2]] == "<|assistant|>"
  assert tok.decode(ids) == text
  # not parsed, the same text is ordinary bytes: no control token comes out of text unless asked
  plain = tok.encode(text)
  assert not set(plain) & set(ids[:3]) and tok.decode(plain) == text
  assert {tok.tokens[i] for i in tok.eog} == {"<|endoftext|>", "<|user|>", "<|observation|>"}

def test_stream_decoder_emits_characters_only_once_complete(tiny):
  tok = Tokenizer.from_gguf(tiny)
  text = "naïve 日本 ok"
  ids = tok.encode(text)
  stream, pieces = StreamDecoder(tok), []
  for i in ids:
    piece = stream.push(i)
    assert "\ufffd" not in piece  # never half a character
    pieces.append(piece)
  assert "".join(pieces) + stream.flush() == text
  assert len([p for p in pieces if p]) < len(ids)  # a multi-byte character waited for its last byte

def test_run_streams_text_to_stdout_and_writes_the_prompt_into_the_template(tiny, tmp_path):
  cmd = [sys.executable, str(ROOT / "examples" / "glm" / "run.py"), "--model", str(tiny), "--count", "6", "--verbose", "--json", str(tmp_path / "a.json")]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  res = json.loads((tmp_path / "a.json").read_text())["results"]["on"]
  tok = Tokenizer.from_gguf(tiny)
  assert out.stdout == tok.decode([t for t in res["tokens"] if t not in tok.eog], skip_special=True) + "\n"  # only the text
  assert "prompt text: '[gMASK]<sop><|user|>The quick brown fox<|assistant|><think>'" in out.stderr
  raw = subprocess.run(cmd + ["--raw"], capture_output=True, text=True, timeout=600)
  assert "prompt text: 'The quick brown fox'" in raw.stderr

def test_generation_ends_at_an_end_of_generation_token(tiny, tmp_path, monkeypatch, capsys):
  # the same greedy run twice: the second is told that its first generated token ends generation, and stops there
  from examples.glm import run
  def generate() -> dict:
    assert run.main(["--model", str(tiny), "--count", "5", "--json", str(tmp_path / "r.json")]) == 0
    return json.loads((tmp_path / "r.json").read_text())["results"]["on"]
  first = generate()
  assert len(first["tokens"]) == 5 and not first["stopped_at_eog"]
  from_kv = Tokenizer.from_kv
  def ending_at(kv, where="the GGUF"):
    tok = from_kv(kv, where)
    tok.eog = frozenset({first["tokens"][0]})
    return tok
  monkeypatch.setattr(run.Tokenizer, "from_kv", staticmethod(ending_at))
  second = generate()
  assert second["tokens"] == first["tokens"][:1] and second["stopped_at_eog"]

def test_generation_launched_ahead_ends_at_the_same_token(tiny, tmp_path, monkeypatch):
  # steps go 8 at a time once the JIT is captured (--ahead): a burst that runs past an end-of-generation token drops
  # what came after it, so the tokens are those of one step at a time, however the ending falls in a burst
  from examples.glm import run
  def generate(*flags) -> dict:
    assert run.main(["--model", str(tiny), "--count", "9", "--json", str(tmp_path / "r.json"), *flags]) == 0
    return json.loads((tmp_path / "r.json").read_text())["results"]["on"]
  one = generate("--ahead", "1")
  assert generate("--ahead", "8")["tokens"] == one["tokens"] and len(one["tokens"]) == 9
  from_kv = Tokenizer.from_kv
  def ending_at(kv, where="the GGUF"):
    tok = from_kv(kv, where)
    tok.eog = frozenset({one["tokens"][5]}) - set(one["tokens"][:5])
    return tok
  monkeypatch.setattr(run.Tokenizer, "from_kv", staticmethod(ending_at))
  ended = generate("--ahead", "8")
  stop = next(i for i, t in enumerate(one["tokens"]) if t == one["tokens"][5])
  assert stop == 5 and ended["tokens"] == one["tokens"][:6] and ended["stopped_at_eog"]

def test_chat_keeps_the_cache_across_turns(tiny):
  cmd = [sys.executable, str(ROOT / "examples" / "glm" / "run.py"), "--model", str(tiny), "--chat", "--verbose", "--count", "4"]
  out = subprocess.run(cmd, input="Hello there\nWhat is 2+2?\n", capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  turns = [l for l in out.stderr.splitlines() if l.startswith("turn ")]
  tok = Tokenizer.from_gguf(tiny)
  fed = [eval(l.split("fed ")[1]) for l in turns]
  assert len(turns) == 2 and "0 cached" in turns[0] and "0 cached" not in turns[1]
  assert [tok.tokens[i] for i in fed[0][:3]] == ["[gMASK]", "<sop>", "<|user|>"]
  for ids in fed: assert [tok.tokens[i] for i in ids[-2:]] == ["<|assistant|>", "<think>"]
  assert "<|user|>What is 2+2?" in tok.decode(fed[1]) and "Hello there" not in tok.decode(fed[1])  # the new turn only
  assert len(out.stdout.splitlines()) == 2  # a reply a turn
