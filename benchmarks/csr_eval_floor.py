"""The floor for weight-sparse eval on the CPU (not a library path): nn.LSTM eval vs a plain
loop of torch.sparse_csr matmuls on randomly pruned copies of its weights.

    python benchmarks/csr_eval_floor.py            # 2x650, T 35, batch 1/4/20, 70%/90%, 1 thread

Prints the median ms of each and the ratio; nothing in rnn_sparsify uses this loop.
"""
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def main(H=650, T=35, layers=2):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for B in (1, 4, 20):
        lstm = torch.nn.LSTM(H, H, layers).eval()
        x = torch.randn(T, B, H)

        def tm(f, n=7):
            f()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3

        with torch.no_grad():
            base = tm(lambda: lstm(x))
            for sp in (0.7, 0.9):
                ws = {}
                for layer in range(layers):
                    for nm in ("ih", "hh"):
                        w = getattr(lstm, f"weight_{nm}_l{layer}").clone()
                        w[torch.rand_like(w) < sp] = 0
                        ws[nm, layer] = w.to_sparse_csr()

                def run():
                    inp = x
                    for layer in range(layers):
                        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
                        pre = torch.sparse.mm(ws["ih", layer], inp.reshape(-1, H).t()).t().reshape(T, B, 4 * H) + bias
                        h = torch.zeros(B, H)
                        c = torch.zeros(B, H)
                        outs = []
                        for t in range(T):
                            g = pre[t] + torch.sparse.mm(ws["hh", layer], h.t()).t()
                            i, f, gg, o = g.chunk(4, 1)
                            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
                            h = torch.sigmoid(o) * torch.tanh(c)
                            outs.append(h)
                        inp = torch.stack(outs)
                    return inp

                t = tm(run)
                print(f"batch {B:2d} sparsity {sp:.0%}: nn.LSTM {base:6.1f} ms, CSR loop {t:6.1f} ms, "
                      f"speed-up {base / t:.2f}x")


if __name__ == "__main__":
    main()
