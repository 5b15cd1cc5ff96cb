"""Attention speed by CPU time, 1 thread: fastlm vs torch SDPA, interleaved, medians.

A check that holds on a loaded machine: process CPU time is not inflated by the waits of a
thread that the scheduler has parked, which dominate wall-clock medians when the 2 cores are
shared. Run: python bench/cputime_attention.py
"""

import torch, fastlm, time, statistics
import torch.nn.functional as F
torch.set_num_threads(1)
def cpu(f):
    c=time.process_time(); f(); return time.process_time()-c
a=torch.randn(1024,1024); b=torch.randn(1024,1024)
torch.mm(a,b); mm=statistics.median(cpu(lambda: torch.mm(a,b)) for _ in range(15)); print(f"mm 1 thread {2*1024**3/mm/1e9:.0f} GFLOP/s")
for (B,H,T,D) in [(1,12,1024,64),(4,12,512,64),(8,12,256,64),(1,16,2048,128)]:
    H2 = H//4 if T<2048 else 2   # fewer heads: same per-head work, shorter runs
    q,k,v=[torch.randn(B,H2,T,D,requires_grad=True) for _ in range(3)]
    do=torch.randn(B,H2,T,D)
    fo=lambda: fastlm.ops.attention(q.detach(),k.detach(),v.detach())
    fs=lambda: F.scaled_dot_product_attention(q.detach(),k.detach(),v.detach(),is_causal=True)
    bo=lambda: torch.autograd.grad(fastlm.ops.attention(q,k,v),(q,k,v),do)
    bs=lambda: torch.autograd.grad(F.scaled_dot_product_attention(q,k,v,is_causal=True),(q,k,v),do)
    res={}
    for name,(x,y) in {"fwd":(fo,fs),"fwdbwd":(bo,bs)}.items():
        x(); y(); r=[]; tx=[]
        for _ in range(5):
            t1=cpu(x); t2=cpu(y); r.append(t2/t1); tx.append(t1)
        fl=(2 if name=="fwd" else 7)*B*H2*T*T*D
        res[name]=(statistics.median(r), fl/statistics.median(tx)/1e9)
    print(f"({B},{H2},{T},{D}) fwd {res['fwd'][0]:.2f}x ({res['fwd'][1]:.0f} GFLOP/s)  fwdbwd {res['fwdbwd'][0]:.2f}x ({res['fwdbwd'][1]:.0f} GFLOP/s)", flush=True)
