"""Reference privacy accounting for WhittlePrivacy's PrivacyAccountant, from Google's dp_accounting.

Run once in a throwaway environment; the output is committed:

    python3 -m venv /tmp/dpvenv && /tmp/dpvenv/bin/pip install dp-accounting==0.6.0
    /tmp/dpvenv/bin/python scripts/make_privacy_fixture.py

Writes Tests/Fixtures/privacy/accounting.json:
- gaussian: the Gaussian mechanism (noise multiplier z) composed `steps` times, ε at δ by dp_accounting's
  RdpAccountant (its default orders) with the optimal order;
- ddg: the sum of n workers' discrete Gaussians (Kairouz, Liu and Steinke 2021, Proposition 14). dp_accounting has
  no event for it, so its three bounds enter as zCDP events (ρ·α + ξ per order), one accountant each, composed
  `steps` times; the per-order minimum is converted by dp_accounting's compute_epsilon;
- zcdp: ρ-zCDP converted to ε at δ by the same accountant.
"""
import json
import math
import pathlib

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORDERS = rdp.DEFAULT_RDP_ORDERS if hasattr(rdp, "DEFAULT_RDP_ORDERS") else None


def accountant():
    return rdp.RdpAccountant() if ORDERS is None else rdp.RdpAccountant(orders=ORDERS)


def gaussian(z, steps, delta):
    acc = accountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), steps))
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return {"noise_multiplier": z, "steps": steps, "delta": delta, "epsilon": eps, "order": order}


def ddg(sigma, n, l1, l2, d, steps, delta):
    tau = 10 * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1)) for k in range(1, n))
    spread = math.sqrt(n) * sigma
    events = [dp_event.ZCDpEvent(l2 ** 2 / (2 * n * sigma ** 2), tau * d),
              dp_event.ZCDpEvent((l2 ** 2 / (n * sigma ** 2) + 2 * l1 * tau / spread + tau ** 2 * d) / 2),
              dp_event.ZCDpEvent((l2 / spread + tau * math.sqrt(d)) ** 2 / 2)]
    rdps = []
    for e in events:
        acc = accountant()
        acc.compose(dp_event.SelfComposedDpEvent(e, steps))
        rdps.append(list(acc._rdp))  # the per-order RDP the accountant holds
        orders = list(acc._orders)
    best = [min(v) for v in zip(*rdps)]
    eps, order = rdp.compute_epsilon(orders, best, delta)
    return {"sigma": sigma, "workers": n, "l1": l1, "l2": l2, "dimension": d, "steps": steps, "delta": delta,
            "epsilon": eps, "order": order, "tau": tau}


def zcdp(rho, delta):
    acc = accountant()
    acc.compose(dp_event.ZCDpEvent(rho))
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return {"rho": rho, "delta": delta, "epsilon": eps, "order": order}


def main():
    acc = accountant()
    fixture = {
        "tool": f"dp_accounting {getattr(dp_accounting, '__version__', '0.6.0')}",
        "orders": list(acc._orders),
        "gaussian": [gaussian(z, t, d) for z in (0.5, 1.0, 2.0, 8.0) for t in (1, 10, 200) for d in (1e-5, 1e-6)],
        # σ in the integer domain; the sensitivities of a clipped, rounded vector (l1 = l2 · min(√d, l2)).
        "ddg": [ddg(s, n, l2 * min(math.sqrt(dim), l2), l2, dim, t, 1e-5)
                for (s, n, l2, dim) in ((0.6, 8, 3.0, 16), (1.0, 4, 10.0, 1000), (50.0, 8, 100.0, 10000),
                                        (2000.0, 100, 2500.0, 1024))
                for t in (1, 20)],
        "zcdp": [zcdp(r, d) for r in (0.025, 0.5, 4.0) for d in (1e-5, 1e-6)],
    }
    out = ROOT / "Tests" / "Fixtures" / "privacy" / "accounting.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {out}: {len(fixture['gaussian'])} Gaussian, {len(fixture['ddg'])} DDG, {len(fixture['zcdp'])} zCDP cases")


if __name__ == "__main__":
    main()
