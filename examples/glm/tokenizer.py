"""A GGUF's tokenizer: byte-level BPE (`tokenizer.ggml.model` "gpt2") as llama.cpp reads it, built on Hugging Face
`tokenizers` (the BPE merging itself is theirs), plus the chat template (`jinja2`) and a streaming decoder.

  tok = Tokenizer.from_gguf("GLM-4.7-Flash-Q4_0.gguf")
  ids = tok.encode("Hello", parse_special=False)      # no BOS unless asked (add_bos=True)
  text = tok.decode(ids)
  prompt = tok.render_chat([{"role": "user", "content": "Hello"}])   # the GGUF's chat template, generation prompt on

What it reads from the GGUF: `tokenizer.ggml.tokens` (the vocab, in GPT-2's byte-to-unicode spelling), `.merges` (ranked
BPE merges), `.token_type` (control tokens are matched whole where special tokens are parsed, and are never merged
from text), `.pre` (the pre-tokenizer: which regexes split text before BPE, PRE_TOKENIZERS), the bos/eos/eot/eom ids
and `tokenizer.chat_template`. An unknown tokenizer model or pre-tokenizer is a TokenizerError, not a guess.
"""
from __future__ import annotations
import os
from dataclasses import dataclass
import gguf
from tokenizers import Tokenizer as HFTokenizer, Regex, AddedToken, models, pre_tokenizers, decoders

class TokenizerError(ValueError):
  """A GGUF whose tokenizer this module cannot build; the message is one line for the user."""

# tokenizer.ggml.pre -> the regexes llama.cpp (src/llama-vocab.cpp, llm_tokenizer_bpe) splits text with, in order: each
# regex splits every piece the previous ones left, its matches and the text between them becoming pieces
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DEEPSEEK_LLM_LETTERS = ("A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥ"
                        "ῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃")
CJK = "[一-龥ࠀ-一가-퟿]+"
PRE_TOKENIZERS: dict[str, list[str]] = {
  "gpt-2": [GPT2],
  "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
  "llama-bpe": [LLAMA3], "llama3": [LLAMA3], "glm4": [LLAMA3],
  "qwen2": [QWEN2], "qwen35": [QWEN35],
  "deepseek-llm": [r"[\r\n]", rf"\s?[{DEEPSEEK_LLM_LETTERS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", CJK, r"\p{N}+"],
  "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, r"\p{N}"],
  "starcoder": [r"\p{N}", GPT2],
}
# llama.cpp uses a whole word's own token where the vocab has one, before merging (tokenizer_ignore_merges; Hugging
# Face's "ignore_merges"): the llama-3 pre-tokenizer's vocabularies
IGNORE_MERGES = {"llama-bpe", "llama3"}

@dataclass
class Tokenizer:
  hf: HFTokenizer
  tokens: list[str]
  token_types: list[int]
  bos: int|None
  eos: int|None
  eog: frozenset[int]       # the ids that end generation: eos, eot, eom and the template's end-of-turn tokens
  chat_template: str|None
  add_bos: bool

  @staticmethod
  def from_gguf(path:str|os.PathLike) -> Tokenizer:
    from examples.glm.model import read_header  # tinygrad.llm.gguf's readers: 0.3 s for a 128K vocab, gguf's GGUFReader 14
    return Tokenizer.from_kv(read_header(path)[0], str(path))

  @staticmethod
  def from_kv(kv:dict, where:str="the GGUF") -> Tokenizer:
    """From a GGUF's key-value metadata."""
    model = kv.get("tokenizer.ggml.model")
    if model != "gpt2": raise TokenizerError(f"{where}: tokenizer.ggml.model {model!r} is not supported (byte-level BPE, 'gpt2', is)")
    pre = kv.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
      raise TokenizerError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported (one of {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens: list[str] = kv["tokenizer.ggml.tokens"]
    types: list[int] = kv.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    return Tokenizer.build(tokens, types, kv.get("tokenizer.ggml.merges", []), pre,
                           {k: kv.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom")},
                           kv.get("tokenizer.chat_template"), bool(kv.get("tokenizer.ggml.add_bos_token", False)))

  @staticmethod
  def build(tokens:list[str], types:list[int], merges:list[str], pre:str, ids:dict[str, int|None], chat_template:str|None=None,
            add_bos:bool=False) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    # a control token is never a merge's product: its text (<|user|>) must not come out of ordinary text
    special = [i for i, t in enumerate(types) if t in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in IGNORE_MERGES)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZERS[pre]] +
                                               [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    eog = {i for k in ("eos", "eot", "eom") if (i := ids.get(k)) is not None}
    # the chat template's end-of-turn markers end a reply too (llama.cpp adds the same: <|user|>, <|observation|>, ...)
    eog |= {vocab[t] for t in ("<|user|>", "<|observation|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>") if t in vocab and vocab[t] in special}
    return Tokenizer(hf, tokens, types, ids.get("bos"), ids.get("eos"), frozenset(eog), chat_template, add_bos)

  def encode(self, text:str, parse_special:bool=False, add_bos:bool=False) -> list[int]:
    """Token ids of text; control tokens written in it (<|user|>) are single tokens only where parse_special."""
    self.hf.encode_special_tokens = not parse_special
    ids = self.hf.encode(text, add_special_tokens=False).ids
    return ([self.bos] if add_bos and self.bos is not None else []) + ids

  def decode(self, ids:list[int], skip_special:bool=False) -> str:
    return self.hf.decode(ids, skip_special_tokens=skip_special)

  def token_bytes(self, i:int) -> bytes:
    """What token i adds to the output: its bytes (a control token: its text)."""
    if self.token_types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED): return self.tokens[i].encode()
    return bytes(BYTE_OF[c] for c in self.tokens[i] if c in BYTE_OF)

  def render_chat(self, messages:list[dict], add_generation_prompt:bool=True, **kwargs) -> str:
    """The conversation as the GGUF's chat template writes it (jinja2, as Hugging Face's apply_chat_template does)."""
    if not self.chat_template: raise TokenizerError("this GGUF has no tokenizer.chat_template (use --raw)")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
    env.globals["raise_exception"] = _raise
    return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                      bos_token=self.tokens[self.bos] if self.bos is not None else "", **kwargs)

def _raise(msg:str): raise TokenizerError(f"chat template: {msg}")

def _byte_chars() -> dict[str, int]:
  # GPT-2's byte <-> printable unicode map (the spelling of byte-level BPE vocabularies)
  bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
  extra = iter(range(256, 512))
  return {(chr(b) if b in bs else chr(next(extra))): b for b in range(256)}
BYTE_OF = _byte_chars()

class StreamDecoder:
  """Text of generated tokens as it becomes complete UTF-8: push(id) returns what can be printed now (a character cut
  across tokens waits for its last byte); flush() the rest, undecodable bytes replaced."""
  def __init__(self, tok:Tokenizer, skip_special:bool=True): self.tok, self.skip, self.pending = tok, skip_special, b""
  def push(self, i:int) -> str:
    if self.skip and self.tok.token_types[i] == gguf.TokenType.CONTROL: return ""
    self.pending += self.tok.token_bytes(i)
    # the longest prefix that is whole UTF-8: a lead byte without all its continuation bytes stays pending
    for cut in range(len(self.pending), max(len(self.pending) - 4, -1), -1):
      try: text = self.pending[:cut].decode()
      except UnicodeDecodeError: continue
      self.pending = self.pending[cut:]
      return text
    text, self.pending = self.pending.decode(errors="replace"), b""
    return text
  def flush(self) -> str:
    text, self.pending = self.pending.decode(errors="replace"), b""
    return text
