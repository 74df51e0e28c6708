"""jinja2 templates of the comparison report: Markdown and self-contained HTML (same sections)."""

from __future__ import annotations

MARKDOWN = """\
# adaptlab comparison{% if r.study %}: `{{ r.study }}` study{% endif %} on `{{ r.model }}`

- Target data: {{ r.data.target | join(", ") }} (learning is measured on its held-out test documents, \
first {{ r.data.eval_docs }} documents{% if r.data.eval_max_chars %}, each cut to {{ r.data.eval_max_chars }} characters{% endif %})
- General probes: {% if r.data.general %}text {{ r.data.general | join(", ") }}; {% endif %}\
{% if r.data.drift %}drift KL(base || tuned); {% endif %}{% if r.data.mc %}multiple choice {{ r.data.mc | join(", ") }}{% endif %}

- Budget: {{ r.budget_note }}
- Learning rates: {{ r.lr_rule }}
{% if r.get("rank_scaling") %}- Rank scaling: {{ r.rank_scaling.text }}
{% endif %}- Seeds per arm: {{ r.seeds }}{% if r.seeds == 1 %} (unreplicated: every difference below is one seed's, so seed-to-seed noise is not in its interval){% endif %}
{% for n in r.notes %}
- {{ n }}
{% endfor %}

## Recommendation

{% for line in summary_lines %}
{{ line }}

{% endfor %}
## Against the pick

{% if any_paired %}Each arm minus the pick, paired over the same held-out documents{% if r.seeds > 1 %} and seeds{% endif %}: an interval that excludes 0 is a difference this run can tell.{% else %}Each arm minus the pick; intervals from the per-arm intervals (no per-document numbers: a conservative test).{% endif %} Learning = base NLL - tuned NLL per token on held-out target text; {{ metric_label }}.

| arm | learning - pick | forgetting - pick | learning | forgetting |{% for h in others %} {{ h }} |{% endfor %} frontier |
| --- | ---: | ---: | ---: | ---: |{% for h in others %} ---: |{% endfor %} :---: |
{% for x in rows %}
| {% if x.pick %}**{{ x.name }}** (pick){% else %}{{ x.name }}{% endif %} | {{ x.d_learning }} | {{ x.d_forgetting }} | {{ x.learning }} | {{ x.forgetting }} |{% for o in x.others %} {{ o }} |{% endfor %} {{ x.frontier }} |
{% endfor %}

![learning vs forgetting]({{ images.scatter }})

## Arms

| arm | setup | seeds | final val loss | target KL base‖tuned / tuned‖base |
| --- | --- | --- | ---: | ---: |
{% for x in arms %}
| {{ x.name }} | {{ x.desc }} | {{ x.seeds }} | {{ x.val_loss }} | {{ x.target_kl }} |
{% endfor %}
{% if predictor %}

Forgetting predictor (KL on the target text, Shenfeld et al. 2025, RL's Razor): {{ predictor.verdict }}.
{% endif %}
{% if extrapolation %}

## Budget extrapolation

Power law y = a * tokens^b per arm family, fitted on its budgets; 95% intervals from refitting on resampled documents (the power-law form itself is assumed). Target: {{ "{:,}".format(extrapolation.target_tokens) }} tokens ({{ "%.1f" | format(extrapolation.factor) }}x the largest budget measured).

| family | budgets | learning at target | forgetting at target |
| --- | --- | ---: | ---: |
{% for f in extrapolation.families %}
| {{ f.name }} | {{ f.learning.tokens | default([]) | map("int") | join(", ") }} | {{ fmt_fit(f.learning) }} | {{ fmt_fit(f.forgetting) }} |
{% endfor %}

{% for line in extrapolation.summary %}
{{ line }}

{% endfor %}
{% endif %}

## Training and validation loss

![loss curves]({{ images.loss }})

## Cost

{% if noisy %}
Step times of {{ noisy | join(", ") }} varied far more than on a quiet machine (another process shared the cores): their wall time and tokens/s are the machine's, not the method's.

{% endif %}
| arm | trainable params | of total | peak memory | wall time | tokens/s | artifact | tokens seen | machine |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |
{% for x in cost %}
| {{ x.name }} | {{ x.trainable }} | {{ x.fraction }} | {{ x.peak_mem }} | {{ x.wall }} | {{ x.tps }} | {{ x.artifact }} | {{ x.tokens }} | {{ x.machine }} |
{% endfor %}

## Published findings, checked against this run

| finding | verdict | evidence | source |
| --- | --- | --- | --- |
{% for f in rec.findings %}
| {{ f.claim }} | **{{ f.get("verdict_text") or f.verdict }}** | {{ f.evidence | join("; ") }} | {{ f.source }} |
{% endfor %}
{% if images.study %}

## Study: {{ r.study }}

![study]({{ images.study }})
{% endif %}
{% if sweeps %}

### LR sweeps

| arm | LR | final val loss | |
| --- | ---: | ---: | --- |
{% for s in sweeps %}
| {{ s.arm }} | {{ s.lr }} | {{ s.val }} | {{ s.chosen }} |
{% endfor %}
{% endif %}
{% if intr %}

## Weight updates: intruder dimensions

Intruder dimension (Shuttleworth et al. 2024): a top-{{ k }} left singular vector of W0 + dW whose largest \
|cosine| with every left singular vector of W0 is below {{ eps }}.

| arm | layers | intruders | layers with intruders | per layer | rel. update norm | mean effective rank | by module type |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |
{% for x in intr %}
| {{ x.name }} | {{ x.layers }} | {{ x.intruders }} | {{ x.with }} | {{ x.per_layer }} | {{ x.rel }} | {{ x.erank }} | {{ x.by_type }} |
{% endfor %}

{% for h in heatmaps %}
![{{ h.arm }} {{ h.kind }}]({{ h.src }})
{% endfor %}
{% endif %}
{% if failed %}

## Arms that did not finish

{% for f in failed %}
- {{ f.name }}: {{ f.error }}
{% endfor %}
{% endif %}
"""

HTML = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>adaptlab comparison{% if r.study %}: {{ r.study }}{% endif %} on {{ r.model }}</title>
<style>
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 16px 24px; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.3em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.86em; width: 100%; }
th, td { border: 1px solid #ddd; padding: 4px 7px; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.pick td { background: #eef7ee; font-weight: 600; }
.rec { background: #f6f8fb; border-left: 4px solid #3b6ea8; padding: 8px 14px; }
.rec p { margin: 6px 0; }
img.plot { max-width: 100%; height: auto; display: block; margin: 8px 0; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 12px; }
.heatmaps figure { margin: 0; flex: 0 1 360px; } .heatmaps img { width: 100%; height: auto; }
.heatmaps figcaption { font-size: 0.85em; text-align: center; }
.verdict-agrees { color: #1f7a1f; font-weight: 600; } .verdict-disagrees { color: #b02a2a; font-weight: 600; }
.verdict-cannot, .verdict-inconclusive, .verdict-mixed { color: #8a6d00; font-weight: 600; } .verdict-not { color: #777; }
ul.setup li { margin: 2px 0; } .small { font-size: 0.85em; color: #555; }
span.ci { font-size: 0.82em; color: #666; } .warn { color: #8a4b00; }
table.main td.num { min-width: 8em; }
</style>
</head>
<body>
<h1>adaptlab comparison{% if r.study %}: <code>{{ r.study }}</code> study{% endif %} on <code>{{ r.model }}</code></h1>
<ul class="setup">
<li>Target data: {{ r.data.target | join(", ") }} (learning measured on its held-out test documents, first {{ r.data.eval_docs }} documents{% if r.data.eval_max_chars %}, each cut to {{ r.data.eval_max_chars }} characters{% endif %})</li>
<li>General probes: {% if r.data.general %}text {{ r.data.general | join(", ") }}; {% endif %}{% if r.data.drift %}drift KL(base || tuned); {% endif %}{% if r.data.mc %}multiple choice {{ r.data.mc | join(", ") }}{% endif %}</li>
<li>Budget: {{ r.budget_note }}</li>
<li>Learning rates: {{ r.lr_rule }}</li>
{% if r.get("rank_scaling") %}<li>Rank scaling: {{ r.rank_scaling.text }}</li>
{% endif %}<li>Seeds per arm: {{ r.seeds }}{% if r.seeds == 1 %} (unreplicated: every difference below is one seed's, so seed-to-seed noise is not in its interval){% endif %}</li>
{% for n in r.notes %}<li>{{ n }}</li>
{% endfor %}
</ul>

<h2>Recommendation</h2>
<div class="rec">
{% for line in summary_lines %}<p>{{ line }}</p>
{% endfor %}
</div>

{% macro num(v) %}{% if ' [' in v %}{{ v.split(' [')[0] }}<br><span class="ci">[{{ v.split(' [')[1] }}</span>{% else %}{{ v }}{% endif %}{% endmacro %}
<h2>Against the pick</h2>
<p class="small">{% if any_paired %}Each arm minus the pick, paired over the same held-out documents{% if r.seeds > 1 %} and seeds{% endif %}:
an interval that excludes 0 is a difference this run can tell.{% else %}Each arm minus the pick; intervals from the per-arm intervals
(no per-document numbers: a conservative test).{% endif %} Learning = base NLL - tuned NLL per token on held-out target text;
{{ metric_label }}.</p>
<table class="main">
<tr><th>arm</th><th>learning &minus; pick</th><th>forgetting &minus; pick</th><th>learning</th><th>forgetting</th>{% for h in others %}<th>{{ h }}</th>{% endfor %}<th>frontier</th></tr>
{% for x in rows %}
<tr{% if x.pick %} class="pick"{% endif %}><td>{{ x.name }}{% if x.pick %} (pick){% endif %}</td>
<td class="num">{{ num(x.d_learning) }}</td><td class="num">{{ num(x.d_forgetting) }}</td><td class="num">{{ num(x.learning) }}</td><td class="num">{{ num(x.forgetting) }}</td>
{% for o in x.others %}<td class="num">{{ num(o) }}</td>{% endfor %}<td>{{ x.frontier }}</td></tr>
{% endfor %}
</table>
<img class="plot" src="{{ images.scatter }}" alt="learning vs forgetting">

<h2>Arms</h2>
<table>
<tr><th>arm</th><th>setup</th><th>seeds</th><th>final val loss</th><th>target KL base&#8214;tuned / tuned&#8214;base</th></tr>
{% for x in arms %}
<tr><td>{{ x.name }}</td><td>{{ x.desc }}</td><td>{{ x.seeds }}</td><td class="num">{{ x.val_loss }}</td><td class="num">{{ x.target_kl }}</td></tr>
{% endfor %}
</table>
{% if predictor %}
<p class="small">Forgetting predictor (KL on the target text, Shenfeld et al. 2025, RL's Razor): {{ predictor.verdict }}.</p>
{% endif %}
{% if extrapolation %}

<h2>Budget extrapolation</h2>
<p class="small">Power law y = a &middot; tokens<sup>b</sup> per arm family, fitted on its budgets; 95% intervals from refitting on resampled
documents (the power-law form itself is assumed). Target: {{ "{:,}".format(extrapolation.target_tokens) }} tokens
({{ "%.1f" | format(extrapolation.factor) }}x the largest budget measured).</p>
<table>
<tr><th>family</th><th>budgets</th><th>learning at target</th><th>forgetting at target</th></tr>
{% for f in extrapolation.families %}
<tr><td>{{ f.name }}</td><td>{{ f.learning.tokens | default([]) | map("int") | join(", ") }}</td><td class="num">{{ num(fmt_fit(f.learning)) }}</td><td class="num">{{ num(fmt_fit(f.forgetting)) }}</td></tr>
{% endfor %}
</table>
<div class="rec">{% for line in extrapolation.summary %}<p>{{ line }}</p>{% endfor %}</div>
{% endif %}

<h2>Training and validation loss</h2>
<img class="plot" src="{{ images.loss }}" alt="loss curves">

<h2>Cost</h2>
{% if noisy %}<p class="warn">Step times of {{ noisy | join(", ") }} varied far more than on a quiet machine (another process shared the cores):
their wall time and tokens/s are the machine's, not the method's.</p>{% endif %}
<table>
<tr><th>arm</th><th>trainable params</th><th>of total</th><th>peak memory</th><th>wall time</th><th>tokens/s</th><th>artifact</th><th>tokens seen</th><th>machine</th></tr>
{% for x in cost %}
<tr><td>{{ x.name }}</td><td class="num">{{ x.trainable }}</td><td class="num">{{ x.fraction }}</td><td class="num">{{ x.peak_mem }}</td>
<td class="num">{{ x.wall }}</td><td class="num">{{ x.tps }}</td><td class="num">{{ x.artifact }}</td><td class="num">{{ x.tokens }}</td><td{% if x.machine.startswith("noisy") %} class="warn"{% endif %}>{{ x.machine }}</td></tr>
{% endfor %}
</table>

<h2>Published findings, checked against this run</h2>
<table>
<tr><th style="width:26%">finding</th><th>verdict</th><th>evidence</th><th style="width:18%">source</th></tr>
{% for f in rec.findings %}
<tr><td>{{ f.claim }}</td><td class="verdict-{{ f.verdict.split(' ')[0] }}">{{ f.get("verdict_text") or f.verdict }}</td><td>{{ f.evidence | join("; ") }}</td><td class="small">{{ f.source }}</td></tr>
{% endfor %}
</table>
{% if images.study %}

<h2>Study: {{ r.study }}</h2>
<img class="plot" src="{{ images.study }}" alt="study">
{% endif %}
{% if sweeps %}
<h3>LR sweeps</h3>
<table>
<tr><th>arm</th><th>LR</th><th>final val loss</th><th></th></tr>
{% for s in sweeps %}<tr><td>{{ s.arm }}</td><td class="num">{{ s.lr }}</td><td class="num">{{ s.val }}</td><td>{{ s.chosen }}</td></tr>
{% endfor %}
</table>
{% endif %}
{% if intr %}

<h2>Weight updates: intruder dimensions</h2>
<p class="small">Intruder dimension (Shuttleworth et al. 2024): a top-{{ k }} left singular vector of W0 + dW whose largest
|cosine| with every left singular vector of W0 is below {{ eps }}.</p>
<table>
<tr><th>arm</th><th>layers</th><th>intruders</th><th>layers with intruders</th><th>per layer</th><th>rel. update norm</th><th>mean effective rank</th><th>by module type</th></tr>
{% for x in intr %}
<tr><td>{{ x.name }}</td><td class="num">{{ x.layers }}</td><td class="num">{{ x.intruders }}</td><td class="num">{{ x.with }}</td>
<td class="num">{{ x.per_layer }}</td><td class="num">{{ x.rel }}</td><td class="num">{{ x.erank }}</td><td>{{ x.by_type }}</td></tr>
{% endfor %}
</table>
<div class="heatmaps">
{% for h in heatmaps %}<figure><img src="{{ h.src }}" alt="{{ h.arm }} {{ h.kind }}"><figcaption>{{ h.arm }}: {{ h.kind }}</figcaption></figure>
{% endfor %}
</div>
{% endif %}
{% if failed %}

<h2>Arms that did not finish</h2>
<ul>{% for f in failed %}<li>{{ f.name }}: {{ f.error }}</li>{% endfor %}</ul>
{% endif %}
</body>
</html>
"""
