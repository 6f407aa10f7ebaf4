import time

import numpy as np
import pytest
import torch

from mistral7b.cache.upload import upload


@pytest.mark.parametrize("values", [[3, 1, 2], np.array([3, 1, 2], dtype=np.int32), torch.tensor([3, 1, 2])])
def test_upload_keeps_values_and_casts(values):
    out = upload(values, torch.device("cpu"), torch.int32)
    assert out.dtype == torch.int32 and out.tolist() == [3, 1, 2]
    assert upload([[5, 6]], torch.device("cpu")).dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_upload_does_not_wait_for_the_stream():
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued ahead of the copy
    out = upload(list(range(1000)), dev, torch.int32)
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    assert out.tolist() == list(range(1000))
    assert queued < total / 4, (queued, total)  # a pageable copy would have returned only after the sleep
