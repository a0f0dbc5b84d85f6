"""RNN_SPARSIFY_KERNELS is applied on the first CUDA backend selection, not at import."""
import torch

import rnn_sparsify.kernels as kernels


def test_env_var_applies_bundle_on_first_cuda_selection(monkeypatch, tmp_path):
    calls = []
    import rnn_sparsify.kernels.cuda_backend as cb

    monkeypatch.setattr(cb, "use_bundle", lambda p: calls.append(p))
    monkeypatch.setenv("RNN_SPARSIFY_KERNELS", str(tmp_path))
    monkeypatch.setattr(kernels, "_ENV_CHECKED", False)
    kernels.select_backend(torch.device("cpu"), torch.float32)
    assert calls == []  # CPU selections never load the GPU runtime
    kernels.select_backend(torch.device("cuda", 0), torch.bfloat16)
    kernels.select_backend(torch.device("cuda", 0), torch.bfloat16)
    assert calls == [str(tmp_path)]
