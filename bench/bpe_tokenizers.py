"""The Python peer of the `bpe` stage: HuggingFace `tokenizers` training the same byte-level
BPE (vocab, min frequency, as many special tokens) on the same train-split text.

    python3 bench/bpe_tokenizers.py CORPUS_SHARD_DIR VOCAB MIN_FREQ N_SPECIAL
Prints the training seconds.
"""
import glob, sys, time
import pyarrow.parquet as pq
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

shards, vocab, min_freq, n_special = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
texts = []
for f in sorted(glob.glob(f"{shards}/*.parquet")):
    t = pq.read_table(f, columns=["text", "split"]).to_pydict()
    texts += [x for x, s in zip(t["text"], t["split"]) if s == "train"]
if not texts:
    sys.exit(f"no train-split text in {shards}/*.parquet: not the corpus's shards")
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=min_freq, show_progress=False,
                              special_tokens=[f"<special:{i}>" for i in range(n_special)],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
start = time.perf_counter()
tok.train_from_iterator(texts, trainer=trainer)
print(f"{time.perf_counter() - start:.3f}")
