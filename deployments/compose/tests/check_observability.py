#!/usr/bin/env python3
"""Checks the compose cluster's observability files, and with --prometheus
evaluates them against a live Prometheus. Used by scripts/compose-test.sh.

    check_observability.py                       # files only
    check_observability.py --prometheus http://127.0.0.1:9090 \
        --metrics coordinator.txt --metrics agent.txt

Files: every dashboard JSON has the keys Grafana needs (uid, title, panels,
schemaVersion; each panel an id, a type, a title and a gridPos inside the 24
columns; each query a refId, the provisioned data source and an expr), uids
are unique; the provisioning files (data source, dashboard provider, alert
rules) have their required keys; the Grafana alert rules hold the same
expressions as the Prometheus rules; the generated files are current.

Live: every panel query and alert expression evaluates without error (Grafana
variables replaced: $__rate_interval 1m, $__interval 15s, $__range 15m); core
panels (dashboards.py --core) return data; every metric a query names is
declared (# TYPE) by a component (the --metrics files, /metrics texts); every
Prometheus target is up, and --expect-targets JOB=N of each job. PyYAML is
required (a check it cannot make fails). --allow-missing-metrics reports
undeclared metrics and down targets without failing (for metrics not
implemented yet).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
COMPOSE = os.path.dirname(HERE)
DASHBOARDS = os.path.join(COMPOSE, "grafana", "dashboards")
PROVISIONING = os.path.join(COMPOSE, "grafana", "provisioning")
RULES = os.path.join(COMPOSE, "prometheus", "rules", "cloudless.rules.yml")
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "15m"}
# Series Prometheus makes itself.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"}
QUERY_PANELS = {"timeseries", "stat", "table", "gauge", "bargauge", "state-timeline", "heatmap"}

problems, notes = [], []


def problem(msg):
    problems.append(msg)


def load_yaml(path):
    try:
        import yaml  # noqa: PLC0415 (optional: Debian python3-yaml)
    except ImportError:
        # A check that cannot run fails: scripts/install-deps.sh installs it.
        problem(f"PyYAML is missing: {os.path.relpath(path, COMPOSE)} cannot be checked (install python3-yaml)")
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def dashboards():
    """(uid, title, panel title, refId, expr) of every query, after the structure checks."""
    queries, uids = [], set()
    files = sorted(f for f in os.listdir(DASHBOARDS) if f.endswith(".json"))
    if len(files) < 7:
        problem(f"expected 7 dashboards in {DASHBOARDS}, found {len(files)}")
    for name in files:
        where = f"dashboards/{name}"
        try:
            with open(os.path.join(DASHBOARDS, name)) as f:
                d = json.load(f)
        except ValueError as e:
            problem(f"{where}: not JSON: {e}")
            continue
        for key in ("uid", "title", "panels", "schemaVersion", "tags", "time"):
            if key not in d:
                problem(f"{where}: no {key!r}")
        if d.get("uid") in uids:
            problem(f"{where}: uid {d.get('uid')!r} used twice")
        uids.add(d.get("uid"))
        if len(d.get("uid", "")) > 40:
            problem(f"{where}: uid longer than 40 characters")
        ids = set()
        for p in d.get("panels", []):
            title = p.get("title", "?")
            for key in ("id", "type", "title", "gridPos"):
                if key not in p:
                    problem(f"{where}: panel {title!r} has no {key!r}")
            if p.get("id") in ids:
                problem(f"{where}: panel id {p.get('id')} used twice")
            ids.add(p.get("id"))
            g = p.get("gridPos", {})
            if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")) or g.get("x", 0) + g.get("w", 0) > 24:
                problem(f"{where}: panel {title!r} has a bad gridPos {g}")
            if p.get("type") not in QUERY_PANELS:
                continue
            if p.get("datasource", {}).get("uid") != "prometheus":
                problem(f"{where}: panel {title!r} does not use the provisioned data source (uid prometheus)")
            targets = p.get("targets") or []
            if not targets:
                problem(f"{where}: panel {title!r} has no query")
            for t in targets:
                if not t.get("refId") or not t.get("expr"):
                    problem(f"{where}: panel {title!r} has a query without refId or expr")
                    continue
                if t.get("datasource", {}).get("uid") != "prometheus":
                    problem(f"{where}: panel {title!r} query {t['refId']} does not use uid prometheus")
                queries.append((d.get("uid"), d.get("title"), title, t["refId"], t["expr"]))
    return queries


def provisioning():
    """(title, expr) of the Grafana alert rules, after the structure checks."""
    ds = load_yaml(os.path.join(PROVISIONING, "datasources", "prometheus.yml"))
    if ds is not None:
        srcs = ds.get("datasources") or []
        if ds.get("apiVersion") != 1 or not any(
                s.get("uid") == "prometheus" and s.get("type") == "prometheus" and s.get("url") for s in srcs):
            problem("provisioning/datasources/prometheus.yml: no Prometheus data source with uid prometheus and a url")
    prov = load_yaml(os.path.join(PROVISIONING, "dashboards", "cloudless.yml"))
    if prov is not None:
        providers = prov.get("providers") or []
        if prov.get("apiVersion") != 1 or not providers or not all(
                p.get("name") and p.get("type") == "file" and (p.get("options") or {}).get("path") for p in providers):
            problem("provisioning/dashboards/cloudless.yml: needs apiVersion 1 and file providers with a name and options.path")
        with open(os.path.join(COMPOSE, "compose.yaml")) as f:
            compose = f.read()
        for p in providers:
            path = (p.get("options") or {}).get("path")
            if path and f":{path}" not in compose:
                problem(f"provisioning/dashboards/cloudless.yml: {path} is not mounted in compose.yaml")
    alerts = load_yaml(os.path.join(PROVISIONING, "alerting", "cloudless.yml"))
    rules = []
    if alerts is not None:
        if alerts.get("apiVersion") != 1 or not alerts.get("groups"):
            problem("provisioning/alerting/cloudless.yml: needs apiVersion 1 and groups")
        for g in alerts.get("groups") or []:
            for key in ("orgId", "name", "folder", "interval", "rules"):
                if key not in g:
                    problem(f"provisioning/alerting/cloudless.yml: group without {key!r}")
            for r in g.get("rules") or []:
                for key in ("uid", "title", "condition", "data", "for", "noDataState", "execErrState"):
                    if key not in r:
                        problem(f"alert rule {r.get('title')!r}: no {key!r}")
                refs = {q.get("refId") for q in r.get("data") or []}
                if r.get("condition") not in refs:
                    problem(f"alert rule {r.get('title')!r}: condition {r.get('condition')!r} is not one of its queries")
                for q in r.get("data") or []:
                    if q.get("datasourceUid") not in ("prometheus", "__expr__"):
                        problem(f"alert rule {r.get('title')!r}: query {q.get('refId')} uses data source {q.get('datasourceUid')!r}")
                    if q.get("datasourceUid") == "prometheus":
                        rules.append((r.get("title"), q["model"]["expr"]))
    prom = load_yaml(RULES)
    prom_rules = []
    if prom is not None:
        prom_rules = [(r["alert"], r["expr"].strip()) for g in prom["groups"] for r in g["rules"] if "alert" in r]
        for name in ("CloudlessNoLeader", "CloudlessLeaderFlapping", "CloudlessNodeDown", "CloudlessReplicasBelowDesired",
                     "CloudlessCertificateExpiring", "CloudlessProposalLatencyHigh", "CloudlessRaftDiskNearlyFull"):
            if name not in dict(prom_rules):
                problem(f"prometheus rules: no alert {name}")
        if alerts is not None and sorted(prom_rules) != sorted((t, e.strip()) for t, e in rules):
            problem("Grafana alert rules and Prometheus rules differ: run python3 deployments/compose/grafana/alerts.py")
    for script in ("dashboards.py", "alerts.py"):
        r = subprocess.run([sys.executable, os.path.join(COMPOSE, "grafana", script), "--check"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            problem(f"grafana/{script} --check: {r.stderr.strip()}")
    return prom_rules


def core_panels():
    r = subprocess.run([sys.executable, os.path.join(COMPOSE, "grafana", "dashboards.py"), "--core"],
                       capture_output=True, text=True, check=True)
    return {tuple(line.split("\t", 1)) for line in r.stdout.splitlines() if line}


def query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            return None, f"HTTP {e.code}"
    except OSError as e:
        return None, str(e)
    if body.get("status") != "success":
        return None, f"{body.get('errorType')}: {body.get('error')}"
    return body["data"]["result"], None


def families(paths):
    declared = set()
    for path in paths:
        with open(path) as f:
            for line in f:
                m = re.match(r"# TYPE (\S+) (\S+)", line)
                if m:
                    declared.add(m.group(1))
    return declared


def names_in(expr):
    # Metric names: identifiers not followed by "(" (functions) that look like ours.
    return set(re.findall(r"\b((?:cloudless|process)_[a-zA-Z0-9_]+|up|ALERTS)\b(?!\s*\()", expr))


def is_declared(name, declared):
    if name in declared or name in PROMETHEUS_OWN:
        return True
    for suffix in ("_total", "_bucket", "_sum", "_count", "_created", "_info"):
        if name.endswith(suffix) and name[: -len(suffix)] in declared:
            return True
    return False


def live(args, panel_queries, prom_rules):
    core = core_panels()
    declared = families(args.metrics)
    undeclared = {}
    ok = empty = 0
    core_seen = set()
    for uid, dtitle, ptitle, ref, expr in panel_queries:
        q = expr
        for var, value in VARIABLES.items():
            q = q.replace(var, value)
        result, err = query(args.prometheus, q)
        where = f"{dtitle} / {ptitle} [{ref}]"
        if err:
            problem(f"query of {where} fails: {err}\n      {q}")
            continue
        ok += 1
        if (uid, ptitle) in core:
            core_seen.add((uid, ptitle))
            if not result:
                problem(f"core panel {where} returned no data: {q}")
        elif not result:
            empty += 1
            notes.append(f"no data (yet): {where}")
        for n in names_in(expr):
            if not is_declared(n, declared):
                undeclared.setdefault(n, set()).add(f"{dtitle} / {ptitle}")
    for uid, title in core - core_seen:
        problem(f"core panel {uid} / {title} not found in the dashboards")
    for alert, expr in prom_rules:
        result, err = query(args.prometheus, expr)
        if err:
            problem(f"alert {alert}: expression fails: {err}")
            continue
        ok += 1
        if result:
            notes.append(f"alert {alert} would fire now: {len(result)} series")
        for n in names_in(expr):
            if not is_declared(n, declared):
                undeclared.setdefault(n, set()).add(f"alert {alert}")
    print(f"    {ok} queries evaluated without error ({len(panel_queries)} panel queries, {len(prom_rules)} alert "
          f"expressions); {len(core_seen)} core panels returned data; {empty} other panel queries empty")
    for n in sorted(undeclared):
        msg = f"metric {n} is exported by no component (used by {', '.join(sorted(undeclared[n]))})"
        (notes if args.allow_missing_metrics else problems).append(msg)
    with urllib.request.urlopen(f"{args.prometheus}/api/v1/targets", timeout=20) as resp:
        targets = json.load(resp)["data"]["activeTargets"]
    for t in targets:
        if t["health"] != "up":
            msg = f"target {t['labels'].get('job')} {t['labels'].get('instance')} is {t['health']}: {t.get('lastError')}"
            (notes if args.allow_missing_metrics else problems).append(msg)
    print(f"    {sum(t['health'] == 'up' for t in targets)} of {len(targets)} Prometheus targets up")
    for want in args.expect_targets:
        job, _, count = want.partition("=")
        up = sum(t["labels"].get("job") == job and t["health"] == "up" for t in targets)
        if up != int(count):
            problem(f"{up} {job} targets up, expected {count}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", help="base URL of a live Prometheus")
    ap.add_argument("--metrics", action="append", default=[], help="a /metrics text (repeatable)")
    ap.add_argument("--allow-missing-metrics", action="store_true")
    ap.add_argument("--expect-targets", action="append", default=[], metavar="JOB=N",
                    help="N targets of job JOB must be up (repeatable)")
    args = ap.parse_args()
    panel_queries = dashboards()
    prom_rules = provisioning()
    print(f"    {len(panel_queries)} panel queries in {len(os.listdir(DASHBOARDS))} dashboards, {len(prom_rules)} alert rules")
    if args.prometheus:
        live(args, panel_queries, prom_rules)
    for n in notes:
        print(f"    note: {n}")
    for p in problems:
        print(f"    FAIL: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
