"""The flagged-token report: the paper's Fig. 2 as a page a person reads.

For every negatively judged sample it shows the instruction, the judgment, and the response
token by token. A token is highlighted when CUT's detector (Eq. 5) flags it: the judgment makes
the model *more* likely to write it, p(y_t|x,j-) / p(y_t|x) > lambda, so it is probably the
mistake the judgment names, and it is what the unlikelihood term pushes down. Hovering a token
shows both probabilities and their ratio.

The page is self-contained (inline CSS, no scripts, no network): it opens from an MLflow
artifact, a Prefect artifact link or a plain file.
"""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 60rem;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.05rem; margin: 0 0 .4rem; }
.lead { color: #555; }
table.metrics { border-collapse: collapse; margin: 1rem 0; }
table.metrics td { border: 1px solid #ddd; padding: .2rem .6rem; font-family: ui-monospace, monospace; }
.sample { border: 1px solid #ddd; border-radius: 8px; padding: 1rem; margin: 1rem 0; }
.label { font-size: .75rem; text-transform: uppercase; letter-spacing: .05em; color: #777; margin-top: .6rem; }
.text, .response { white-space: pre-wrap; font-family: ui-monospace, "SFMono-Regular", monospace; font-size: .9rem; }
.judgment { background: #fff6e5; border-left: 3px solid #f0a020; padding: .3rem .6rem; }
.response { background: #fafafa; padding: .4rem .6rem; line-height: 1.9; }
.tok { border-radius: 3px; }
.tok:hover { outline: 1px solid #888; }
.flag { background: #ffb3b3; color: #7a0000; border-bottom: 2px solid #d00000; }
.special { color: #999; font-size: .75rem; }
.count { color: #555; font-size: .85rem; }
"""


def _fmt_p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.2e}"


def _token_html(token: Mapping[str, Any]) -> str:
    p_judged, p_plain = float(token["p_judged"]), float(token["p_plain"])
    ratio = p_judged / p_plain if p_plain > 0 else math.inf
    tip = (f"p(y|x,j\u2212) = {_fmt_p(p_judged)}\np(y|x) = {_fmt_p(p_plain)}\nratio = {ratio:.3g}"
           + ("\nflagged" if token.get("flagged") else ""))
    classes = ["tok"] + (["flag"] if token.get("flagged") else []) + (["special"] if token.get("special") else [])
    text = token.get("text", "")
    return (f'<span class="{" ".join(classes)}" title="{html.escape(tip, quote=True)}">'
            f"{html.escape(text) if text else '&#8203;'}</span>")


def _sample_html(number: int, sample: Mapping[str, Any]) -> str:
    tokens = sample.get("tokens") or []
    parts = [f'<div class="sample"><h2>Sample {number}</h2>',
             '<div class="label">Instruction</div>',
             f'<div class="text">{html.escape(str(sample.get("instruction", "")))}</div>',
             '<div class="label">Judgment</div>',
             f'<div class="text judgment">{html.escape(str(sample.get("judgment") or "(positive, no text)"))}</div>',
             '<div class="label">Response</div>']
    if tokens:
        n_flagged = sum(bool(t.get("flagged")) for t in tokens)
        parts.append(f'<div class="response">{"".join(_token_html(t) for t in tokens)}</div>')
        parts.append(f'<div class="count">{n_flagged} of {len(tokens)} tokens flagged</div>')
    else:
        parts.append(f'<div class="response">{html.escape(str(sample.get("response", "")))}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def flag_report_html(samples: Sequence[Mapping[str, Any]], *, title: str = "Flagged tokens",
                     threshold: float | None = None, metrics: Mapping[str, Any] | None = None) -> str:
    """A self-contained HTML page of negative samples with their flagged tokens highlighted.

    samples: `evaluate(...)["flag_samples"]` (each: instruction, judgment, response, tokens with
    text, flagged, p_judged, p_plain; samples without tokens are shown as plain text).
    threshold: lambda (read from the samples when not given). metrics: optional summary table.
    """
    if threshold is None:
        threshold = next((s.get("threshold") for s in samples if s.get("threshold") is not None), None)
    rule = ("p(y<sub>t</sub>|x,j&minus;) / p(y<sub>t</sub>|x) &gt; &lambda;"
            + (f" = {html.escape(str(threshold))}" if threshold is not None else ""))
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="lead">Responses the judge called negative. A highlighted token is one the judgment '
            f"makes more likely ({rule}, CUT Eq. 5): the likely mistake, the token the unlikelihood term "
            f"pushes down. Hover a token for both probabilities.</p>"]
    if metrics:
        cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_metric(v))}</td></tr>"
                        for k, v in metrics.items())
        body.append(f'<table class="metrics">{cells}</table>')
    if not samples:
        body.append("<p>No negative samples: nothing to flag.</p>")
    body += [_sample_html(k + 1, s) for k, s in enumerate(samples)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
