"""lmjax's PyTorch peer: what a PyTorch user gets for the `1b` training step (Llama-3.2-1B shapes) on
one GPU: Hugging Face transformers' LlamaForCausalLM, bf16 parameters, fused AdamW, SDPA attention,
eager and torch.compile, optionally with Liger Kernel's fused linear cross-entropy and fused
RMSNorm/RoPE/SwiGLU (as a PyTorch user chasing speed would turn on).

  python3 benchmarks/torch_peer.py --runs=B4xT4096:compile,B8xT2048:compile \
      [--liger=B4xT4096:compile,B8xT2048:compile,B4xT4096:eager,B8xT2048:eager]

`--liger` lists the runs made again with Liger Kernel, after the others. Each run is its own process: a
run that fails (a kernel that does not compile, a CUDA fault that poisons the context) is recorded as
'failed: ...' and the others still run; the file is rewritten after each run.

Writes $OUT/torch_peer.json as {'B<b> T<t> compile=<bool> liger=<bool>': {step_ms, tokens_per_s, mfu,
peak_mem_gb}}, the format benchmarks/train_throughput.py --peer reads. Tokens/s is B*T over the median
step time of 10 steps after 3 warm-up steps (random tokens, labels = inputs, as transformers shifts
them). MFU counts 6N (N with the tied embedding counted once, for the head matmul) plus causal
attention 6*L*H*Dh*T a token (PaLM appendix B) over 989 TFLOP/s, lmjax's model.flops_per_token.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16


def llama_1b_config():
  from transformers import LlamaConfig
  return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     attn_implementation='sdpa')


def measure(batch: int, seq: int, compile_: bool, liger: bool, steps: int = 10, warmup: int = 3) -> dict:
  from transformers import LlamaForCausalLM
  if liger:
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                cross_entropy=False)
  cfg = llama_1b_config()
  torch.manual_seed(0)
  model = LlamaForCausalLM(cfg).to('cuda', dtype=torch.bfloat16)
  model.train()
  params = sum(p.numel() for p in model.parameters())  # tied: the embedding once
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
  fwd = torch.compile(model) if compile_ else model
  tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device='cuda')

  def step():
    loss = fwd(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(warmup):
    step()
  torch.cuda.synchronize()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  dt = sorted(times)[len(times) // 2]
  head_dim = cfg.hidden_size // cfg.num_attention_heads
  flops_per_token = 6 * params + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq
  out = dict(step_ms=round(dt * 1e3, 1), tokens_per_s=round(batch * seq / dt),
             mfu=round(flops_per_token * batch * seq / dt / PEAK_FLOPS, 4), params=params,
             peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 1))
  del model, opt, fwd
  torch.cuda.empty_cache()
  torch.cuda.reset_peak_memory_stats()
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--runs', default='B4xT4096:eager,B4xT4096:compile,B8xT2048:compile')
  parser.add_argument('--liger', default='', help="runs (as --runs) made with Liger's kernels")
  parser.add_argument('--out', default=os.environ.get('OUT', '.'))
  parser.add_argument('--one', default='', help=argparse.SUPPRESS)  # internal: B<b>xT<t>:<mode>:<liger>
  a = parser.parse_args()
  torch.backends.cuda.matmul.allow_tf32 = True
  if a.one:  # one run in this process; prints its JSON line
    shape, mode, liger = a.one.split(':')
    b, t = (int(s[1:]) for s in shape.split('x'))
    print(json.dumps(measure(b, t, mode == 'compile', liger == 'True')), flush=True)
    return
  results = {}
  plan = [(False, run) for run in a.runs.split(',')] + [(True, run) for run in filter(None, a.liger.split(','))]
  for liger, run in plan:
    shape, mode = run.split(':')
    b, t = (int(s[1:]) for s in shape.split('x'))
    key = f'B{b} T{t} compile={mode == "compile"} liger={liger}'
    proc = subprocess.run([sys.executable, __file__, f'--one={run}:{liger}'], capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if proc.returncode == 0 and lines:
      results[key] = json.loads(lines[-1])
    else:  # one that does not fit, compile or run is reported as failed, the others still run
      errors = [l for l in proc.stderr.strip().splitlines() if 'Error' in l or 'error' in l]
      results[key] = f'failed: {(errors or proc.stderr.strip().splitlines() or ["no output"])[-1]}'[:300]
    print(key, results[key], flush=True)
    with open(os.path.join(a.out, 'torch_peer.json'), 'w') as f:
      json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, runs=results), f, indent=1)


if __name__ == '__main__':
  main()
