"""The Python peer of the `ingest` stage: the same parse, clean-up, dedupe, split and
Parquet (zstd) write, with pyarrow. Run by bench/ingest.sh beside `orchestrate`.

    python3 bench/ingest_pyarrow.py OUT_DIR PATH:LANG [PATH:LANG ...]
"""
import hashlib, os, re, sys, unicodedata
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("lang", pa.string()),
                    ("lang_confidence", pa.float32()), ("author", pa.string()),
                    ("source", pa.string()), ("split", pa.string())])
ROW_GROUP, SHARD = 50_000, 500_000
AUTHOR_END = re.compile(r'[,("«\[;“/]')

def files_of(path):
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.endswith(".dat"))
        return [os.path.join(path, n) for n in names
                if os.path.isfile(os.path.join(path, n)) and not os.path.islink(os.path.join(path, n))]
    return [path]

def records(path):
    rec = []
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if line == b"%":
                if rec:
                    yield b"\n".join(rec)
                rec = []
            else:
                rec.append(line)
    if rec:
        yield b"\n".join(rec)

def split_attribution(text):
    lines = text.split("\n")
    last = max((i for i, l in enumerate(lines) if l.strip()), default=None)
    if last is None:
        return "", None
    for i in range(max(0, last - 2), last + 1):
        t = lines[i].lstrip()
        for dash in ("--", "—", "―"):
            if t.startswith(dash) and i > 0:
                attribution = " ".join([t[len(dash):]] + lines[i + 1:last + 1])
                return "\n".join(lines[:i]), parse_author(attribution)
    return text, None

def parse_author(s):
    s = s.lstrip("-—― \t")
    m = AUTHOR_END.search(s)
    name = " ".join((s[:m.start()] if m else s).split()).rstrip(".: ")
    name = unicodedata.normalize("NFC", name)
    return name if sum(c.isalpha() for c in name) >= 2 and len(name) <= 60 else None

def normalize(text):
    paras, cur = [], []
    for line in unicodedata.normalize("NFC", text).split("\n"):
        words = line.split()
        if words:
            cur.extend(words)
        elif cur:
            paras.append(" ".join(cur)); cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n".join(paras)

class Writer:
    def __init__(self, out):
        self.out, self.shard, self.in_shard, self.writer = out, 0, 0, None
        self.cols = {n: [] for n in SCHEMA.names}
    def push(self, row):
        for k, v in row.items():
            self.cols[k].append(v)
        self.in_shard += 1
        if len(self.cols["id"]) >= ROW_GROUP or self.in_shard >= SHARD:
            self.flush()
        if self.in_shard >= SHARD:
            self.writer.close(); self.writer = None; self.in_shard = 0
    def flush(self):
        if not self.cols["id"]:
            return
        if self.writer is None:
            path = os.path.join(self.out, f"part-{self.shard:05d}.parquet")
            self.writer = pq.ParquetWriter(path, SCHEMA, compression="zstd", compression_level=3)
            self.shard += 1
        self.writer.write_table(pa.table(self.cols, schema=SCHEMA), row_group_size=ROW_GROUP)
        self.cols = {n: [] for n in SCHEMA.names}
    def close(self):
        self.flush()
        if self.writer:
            self.writer.close()

def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    w, seen, kept = Writer(out), set(), 0
    for spec in sys.argv[2:]:
        path, lang = spec.rsplit(":", 1)
        for f in files_of(path):
            for raw in records(f):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                body, author = split_attribution(text)
                body = normalize(body)
                if not (8 <= len(body) <= 4000):
                    continue
                h = hashlib.blake2b(body.encode(), digest_size=32).digest()
                if h[:16] in seen:
                    continue
                seen.add(h[:16])
                u = (int.from_bytes(h[16:24], "little") >> 11) / 2**53
                split = "test" if u < 0.02 else "val" if u < 0.04 else "train"
                w.push({"id": h.hex()[:16], "text": body, "lang": lang, "lang_confidence": 1.0,
                        "author": author, "source": f, "split": split})
                kept += 1
    w.close()
    print(kept, file=sys.stderr)

main()
