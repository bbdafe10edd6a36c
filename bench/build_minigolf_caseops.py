"""Build the mini-golf data set in CaseOps form (for the CaseOps ablation): the same documents and the same
validation documents as PRESET=minigolf's own builder, transformed and tokenised with the leader's CaseOps
sp8192 model, plus the validation byte sidecar.

Usage: python3 bench/build_minigolf_caseops.py OUT_DIR
Then:  PRESET=minigolf CASEOPS=1 TRAIN_FILES=OUT_DIR/fineweb_train_*.bin VAL_FILES=OUT_DIR/fineweb_val_0*.bin \
       TOKENIZER_PATH=../shared/data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model ...
"""
import sys
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))
import caseops  # noqa: E402
import train_gpt as tg  # noqa: E402

CASEOPS_MODEL = tg.SHARED_DATA / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def main():
    """Select the documents exactly like build_default_data, then write CaseOps shards and the sidecar."""
    out = Path(sys.argv[1])
    plain = spm.SentencePieceProcessor(model_file=str(tg.SHARED_TOKENIZER))
    train_docs, val_files = tg.shared_text_documents()
    val_docs, n = [], 0
    for pair in zip(*val_files):
        for d in pair:
            if n <= tg.MINIGOLF_VAL_TOKENS:
                val_docs.append(d)
                n += len(plain.encode(d)) + 1
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL))
    info = caseops.build_caseops_shards(val_docs + train_docs, sp, out, val_docs=len(val_docs))
    print(info)


if __name__ == "__main__":
    main()
