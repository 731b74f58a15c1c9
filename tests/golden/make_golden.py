"""Write the frozen golden frames of the current format version.  Run only together with a format
version bump (frames of earlier versions stay, as NAME.vN.ecf8):

    python tests/golden/make_golden.py ../shared/data

Sources are real MiniLM weights (20,000 of each dtype); both the source arrays (.npy) and the
frames (.ecf8) are committed, so the golden tests need nothing outside the repository.
"""

import sys
from pathlib import Path

import ml_dtypes
import numpy as np

import ecf8
from ecf8.format import VERSION

HERE = Path(__file__).parent
NAME = "encoder.layer.0.attention.self.query.weight"


def sources(data: Path) -> dict[str, np.ndarray]:
    fp8 = np.load(data / "minilm-layer0-fp8-e4m3fn-block128.npz")[NAME].reshape(-1)[:20000]
    bf16 = np.load(data / "minilm-layer0-bf16.npz")[NAME].view(ml_dtypes.bfloat16).reshape(-1)[:20000]
    w = bf16.astype(np.float32)
    return {
        "e4m3": fp8.view(ml_dtypes.float8_e4m3fn).reshape(100, 200),
        "e5m2": (w / np.abs(w).max() * 57344).astype(ml_dtypes.float8_e5m2).reshape(200, 100),
        "bf16": bf16.reshape(4, 50, 100),
        "fp16": w.astype(np.float16),
    }


if __name__ == "__main__":
    for name, x in sources(Path(sys.argv[1])).items():
        np.save(HERE / f"{name}.npy", x.view(np.uint8 if x.itemsize == 1 else np.uint16))
        blob = ecf8.encode(x, chunk_size=4096, max_tables=4)
        (HERE / f"{name}.v{VERSION}.ecf8").write_bytes(blob)
        print(name, x.shape, ecf8.info(blob).bits_per_weight)
