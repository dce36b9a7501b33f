"""Makes the tiny random-weight Llama models for the real-vLLM examples, no model hub needed.

    python make_models.py OUT_DIR

OUT_DIR/chatml and OUT_DIR/mistral: the same weights and the same real tokenizer (mistral_common's
`tekken_240911.json`, 131,072 ids, converted to `tokenizer.json` by transformers), with two chat
templates: ChatML (every turn rendered in order, so a conversation's history is a prefix of its
next turn) and a Mistral-style one (the system prompt moved into the LAST user turn, so the
rendered history is not a prefix of the next turn).
"""

import os
import shutil
import sys

import mistral_common
import torch
import transformers
from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mistral's instruct template (v7 tekken): the system message is prepended to the last user turn.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST]' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def main(out: str) -> None:
    tekken = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
    torch.manual_seed(0)
    model = None
    for name, template in (("chatml", CHATML), ("mistral", MISTRAL)):
        d = os.path.join(out, name)
        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        tok = convert_tekken_tokenizer(tekken, chat_template=template)
        tok.save_pretrained(tmp)
        if model is None:
            config = transformers.LlamaConfig(
                vocab_size=len(tok),
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=2,  # head_dim 64 (vLLM's CPU backend refuses 16)
                num_key_value_heads=1,
                max_position_embeddings=4096,
                tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                torch_dtype="bfloat16",
            )
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp)
        shutil.rmtree(d, ignore_errors=True)
        os.rename(tmp, d)
        print(f"{d}: vocab {len(tok)}, bos {tok.bos_token!r}, eos {tok.eos_token!r}")


if __name__ == "__main__":
    main(sys.argv[1])
