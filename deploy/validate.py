"""Offline checks of the deployment files; run by deploy/validate.sh, which
provides the tools (a venv with kubernetes-validate, kubectl, nginx).

usage: validate.py CHECK [args]   (CHECK: k8s, kustomize-fallback, kustomize,
                                   nginx-drift, compose, grafana, dockerfile)
Each check prints one summary line and exits non-zero on the first problem.
"""

import glob
import json
import os
import re
import sys

import yaml

K8S_VERSION = os.environ.get("K8S_SCHEMA_VERSION", "1.30.0")

# Files in k8s/ that `kubectl apply -k` must not apply; see kustomization.yaml.
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "migrate-job.yaml"}

# The metric families seatsync exports (README); histograms also end in
# _bucket/_sum/_count.
METRICS = {
    "seatsync_http_requests_total": "counter",
    "seatsync_http_request_duration_seconds": "histogram",
    "seatsync_holds_total": "counter",
    "seatsync_events_relayed_total": "counter",
    "seatsync_event_commit_to_send_seconds": "histogram",
    "seatsync_listener_reconnects_total": "counter",
    "seatsync_listener_up": "gauge",
    "seatsync_db_pool_size": "gauge",
    "seatsync_db_pool_available": "gauge",
    "seatsync_db_pool_waiting": "gauge",
    "seatsync_sse_connections": "gauge",
    "seatsync_sse_channels": "gauge",
}


class Invalid(Exception):
    pass


def load_docs(path):
    with open(path) as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            raise Invalid(f"{path}: not valid YAML: {e}")
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise Invalid(f"{path}: a document without apiVersion/kind")
    return docs


def schema_check(docs, where):
    import kubernetes_validate

    for d in docs:
        name = f"{where}: {d['kind']}/{d.get('metadata', {}).get('name', '?')}"
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            raise Invalid(f"{name}: {e.message} (at {path or 'top level'})")
        except kubernetes_validate.SchemaNotFoundError as e:
            raise Invalid(f"{name}: {d['apiVersion']} {d['kind']} does not exist in Kubernetes {K8S_VERSION}")


def by_kind(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def policy_check(docs):
    """What the schemas cannot say: the settings that must agree."""
    objs = by_kind(docs)
    dep = objs.get(("Deployment", "seatsync"))
    cm = objs.get(("ConfigMap", "seatsync"))
    ing = objs.get(("Ingress", "seatsync"))
    hpa = objs.get(("HorizontalPodAutoscaler", "seatsync"))
    if not (dep and cm and ing and hpa):
        raise Invalid("k8s: Deployment, ConfigMap, Ingress and HPA `seatsync` must all exist")
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "seatsync")
    if c["readinessProbe"]["httpGet"]["path"] != "/readyz" or c["livenessProbe"]["httpGet"]["path"] != "/healthz":
        raise Invalid("k8s: readiness must probe /readyz and liveness /healthz")
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["terminationGracePeriodSeconds"]
    # The replica exits within 10 s of SIGTERM, which comes after preStop.
    if grace < sleep + 10 + 2:
        raise Invalid(f"k8s: terminationGracePeriodSeconds {grace} < preStop {sleep} s + 10 s shutdown + margin")
    if dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] != 0:
        raise Invalid("k8s: rolling update must keep maxUnavailable 0")
    sc = c["securityContext"]
    want = {"runAsNonRoot": True, "runAsUser": 10001, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
    for k, v in want.items():
        if sc.get(k) != v:
            raise Invalid(f"k8s: seatsync container securityContext.{k} must be {v}")
    if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        raise Invalid("k8s: seatsync container must drop ALL capabilities and use the RuntimeDefault seccomp profile")
    if hpa["spec"]["minReplicas"] < 3:
        raise Invalid("k8s: HPA minReplicas must be at least 3")
    heartbeat = int(cm["data"]["HEARTBEAT_SECONDS"])
    ann = ing["metadata"]["annotations"]
    for t in ("proxy-read-timeout", "proxy-send-timeout"):
        if int(ann[f"nginx.ingress.kubernetes.io/{t}"]) <= heartbeat:
            raise Invalid(f"k8s: ingress {t} must exceed HEARTBEAT_SECONDS ({heartbeat})")
    if ann.get("nginx.ingress.kubernetes.io/proxy-buffering") != "off":
        raise Invalid("k8s: ingress must turn proxy-buffering off for SSE")
    if "http_5" in ann.get("nginx.ingress.kubernetes.io/proxy-next-upstream", "http_5"):
        raise Invalid("k8s: ingress proxy-next-upstream must be limited to error/timeout")
    secret = objs.get(("Secret", "seatsync"))
    for key in ("AUTH_SECRET", "ADMIN_TOKEN"):
        # seatsync refuses secrets under 16 characters: a forgotten
        # placeholder must stop the replica, not sign tokens with it.
        if not secret or len(secret["stringData"][key]) >= 16:
            raise Invalid(f"k8s: the example {key} must stay a placeholder seatsync rejects (< 16 characters)")


def check_k8s(k8s_dir):
    files = sorted(f for f in glob.glob(os.path.join(k8s_dir, "*.yaml")) if os.path.basename(f) != "kustomization.yaml")
    docs = []
    for f in files:
        fd = load_docs(f)
        schema_check(fd, f)
        docs += fd
    policy_check(docs)
    major_minor = ".".join(K8S_VERSION.split(".")[:2])
    print(f"k8s: {len(docs)} documents in {len(files)} files valid against Kubernetes {major_minor} schemas (strict); probes, shutdown timing, securityContext and SSE timeouts agree")


def kustomization(k8s_dir):
    with open(os.path.join(k8s_dir, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    resources = k.get("resources", [])
    on_disk = {os.path.basename(f) for f in glob.glob(os.path.join(k8s_dir, "*.yaml"))} - {"kustomization.yaml"}
    for r in resources:
        if not os.path.isfile(os.path.join(k8s_dir, r)):
            raise Invalid(f"kustomize: resource {r} listed in kustomization.yaml does not exist")
    left_out = on_disk - set(resources) - NOT_IN_KUSTOMIZATION
    if left_out:
        raise Invalid(f"kustomize: {', '.join(sorted(left_out))} in k8s/ but not in kustomization.yaml")
    wrongly_in = set(resources) & NOT_IN_KUSTOMIZATION
    if wrongly_in:
        raise Invalid(f"kustomize: {', '.join(sorted(wrongly_in))} must not be applied by kustomization.yaml")
    return k, resources


def check_kustomize(k8s_dir, rendered_path, renderer):
    """Checks what kubectl kustomize rendered."""
    k, resources = kustomization(k8s_dir)
    expected = sum(len(load_docs(os.path.join(k8s_dir, r))) for r in resources)
    docs = load_docs(rendered_path)
    if len(docs) != expected:
        raise Invalid(f"kustomize: rendered {len(docs)} documents, the listed files hold {expected}")
    render_checks(k, docs)
    schema_check(docs, "rendered")
    print(f"kustomize: k8s/ renders with {renderer}: {len(docs)} documents from {len(resources)} files, all schema-valid; "
          f"every other file in k8s/ is deliberately outside ({', '.join(sorted(NOT_IN_KUSTOMIZATION))})")


def render_checks(k, docs):
    ns = k.get("namespace")
    for d in docs:
        if d["kind"] != "Namespace" and ns and d["metadata"].get("namespace") != ns:
            raise Invalid(f"kustomize: {d['kind']}/{d['metadata']['name']} not in namespace {ns}")
    images = {i["name"]: i for i in k.get("images", [])}
    for d in docs:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if c["image"] in images:
                raise Invalid(f"kustomize: image {c['image']} was not replaced")


def check_kustomize_fallback(k8s_dir):
    """No kubectl: do what `kubectl kustomize` would for the fields we use."""
    k, resources = kustomization(k8s_dir)
    allowed = {"apiVersion", "kind", "namespace", "resources", "images"}
    unknown = set(k) - allowed
    if unknown:
        raise Invalid(f"kustomize (fallback): cannot render fields {sorted(unknown)}; install kubectl")
    docs = []
    for r in resources:
        docs += load_docs(os.path.join(k8s_dir, r))
    images = {i["name"]: i for i in k.get("images", [])}
    for d in docs:
        if d["kind"] != "Namespace" and k.get("namespace"):
            d["metadata"]["namespace"] = k["namespace"]
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            i = images.get(c["image"])
            if i:
                c["image"] = f"{i.get('newName', c['image'])}:{i['newTag']}" if "newTag" in i else i.get("newName", c["image"])
    seen = set()
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        if key in seen:
            raise Invalid(f"kustomize (fallback): {key[0]}/{key[1]} defined twice")
        seen.add(key)
    render_checks(k, docs)
    schema_check(docs, "rendered")
    print(f"kustomize: no kubectl; Python fallback rendered k8s/ (resources, namespace, images): {len(docs)} documents "
          f"from {len(resources)} files, all schema-valid; every other file in k8s/ is deliberately outside "
          f"({', '.join(sorted(NOT_IN_KUSTOMIZATION))})")


def nginx_significant(path):
    """The directives of an nginx conf with comments and the upstream's
    server addresses removed: what must be identical between the two."""
    out, in_upstream = [], False
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("upstream "):
            in_upstream = True
        elif in_upstream and line == "}":
            in_upstream = False
        elif in_upstream and line.startswith("server "):
            # Keep the parameters, only the address may differ.
            line = "server ADDR " + " ".join(line.split()[2:])
        out.append(" ".join(line.split()))
    # Same server parameters for each upstream entry; their count may differ.
    return [l for i, l in enumerate(out) if not (l.startswith("server ADDR") and i > 0 and out[i - 1] == l)]


def check_nginx_drift(a, b):
    sa, sb = nginx_significant(a), nginx_significant(b)
    if sa != sb:
        import difflib

        diff = "\n".join(difflib.unified_diff(sa, sb, a, b, lineterm="", n=0))
        raise Invalid(f"nginx: {b} differs from {a} beyond the upstream addresses:\n{diff}")
    print(f"nginx: {b} matches {a} except the upstream addresses ({len(sa)} directives compared)")


def check_compose(path):
    with open(path) as f:
        c = yaml.safe_load(f)
    services = c.get("services") or {}
    if "postgres" not in services or "nginx" not in services:
        raise Invalid(f"compose: {path} needs services postgres and nginx")
    if not str(services["postgres"].get("image", "")).startswith("postgres:15"):
        raise Invalid("compose: postgres must run PostgreSQL 15")
    replicas = [n for n, s in services.items() if n.startswith("seatsync")]
    if len(replicas) < 3:
        raise Invalid(f"compose: needs 3 seatsync replicas, has {len(replicas)}")
    for n in replicas:
        s = services[n]
        if "image" not in s and "build" not in s:
            raise Invalid(f"compose: {n} has neither image nor build")
        if "build" in s:
            ctx = os.path.normpath(os.path.join(os.path.dirname(path), s["build"]["context"]))
            df = os.path.join(ctx, s["build"].get("dockerfile", "Dockerfile"))
            if not os.path.isfile(df):
                raise Invalid(f"compose: {n} builds from {df}, which does not exist")
        env = s.get("environment", {})
        for k in ("DATABASE_URL", "AUTH_SECRET"):
            if k not in env:
                raise Invalid(f"compose: {n} lacks {k}")
        if len(str(env["AUTH_SECRET"]).encode()) < 32:
            raise Invalid(f"compose: {n} AUTH_SECRET must be at least 32 bytes")
    secrets = {str(services[n]["environment"]["AUTH_SECRET"]) for n in replicas}
    if len(secrets) != 1:
        raise Invalid("compose: AUTH_SECRET must be identical on every replica")
    for s in services.values():
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("."):
                full = os.path.normpath(os.path.join(os.path.dirname(path), src))
                if not os.path.exists(full):
                    raise Invalid(f"compose: volume source {src} ({full}) does not exist")
    print(f"compose: {path} parses: {len(services)} services (postgres, {len(replicas)} seatsync replicas, nginx), "
          f"builds from deploy/Dockerfile, one AUTH_SECRET")


def check_grafana(path):
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise Invalid(f"grafana: {path} is not valid JSON: {e}")
    variables = d.get("templating", {}).get("list", [])
    ds = [v for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if not ds:
        raise Invalid("grafana: needs a Prometheus datasource variable")
    ds_ref = "${" + ds[0]["name"] + "}"
    panels = [p for p in d.get("panels", []) if p.get("type") != "row"]
    used, queries = set(), 0
    for p in panels:
        if not p.get("targets"):
            raise Invalid(f"grafana: panel {p.get('title')!r} has no queries")
        for t in p["targets"]:
            if t.get("datasource", {}).get("uid") != ds_ref:
                raise Invalid(f"grafana: panel {p.get('title')!r} does not use the {ds_ref} datasource")
            queries += 1
            for m in re.findall(r"\bseatsync_[a-z0-9_]+", t.get("expr", "")):
                family = re.sub(r"_(bucket|sum|count)$", "", m)
                kind = METRICS.get(family)
                if kind is None or (family != m and kind != "histogram"):
                    raise Invalid(f"grafana: panel {p.get('title')!r} queries unknown metric {m}")
                if kind == "histogram" and family == m:
                    raise Invalid(f"grafana: panel {p.get('title')!r} queries histogram {m} without _bucket/_sum/_count")
                used.add(family)
    for v in variables:
        for m in re.findall(r"\bseatsync_[a-z0-9_]+", json.dumps(v.get("query", ""))):
            if m not in METRICS:
                raise Invalid(f"grafana: variable {v['name']} queries unknown metric {m}")
    missing = set(METRICS) - used
    if missing:
        raise Invalid(f"grafana: no panel shows {', '.join(sorted(missing))}")
    print(f"grafana: {path}: {len(panels)} panels, {queries} queries, all {len(used)} metric families known and shown, datasource variable {ds_ref}")


def check_dockerfile(path, dockerignore):
    lines = []
    for raw in open(path).read().replace("\\\n", " ").splitlines():
        raw = raw.strip()
        if raw and not raw.startswith("#"):
            lines.append(raw)
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
    froms = [i for i, (op, _) in enumerate(instr) if op == "FROM"]
    if len(froms) < 2:
        raise Invalid(f"dockerfile: {path} must be multi-stage")
    final = instr[froms[-1]:]
    users = [arg for op, arg in final if op == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        raise Invalid(f"dockerfile: the runtime stage must end with a non-root USER")
    if not any(op == "EXPOSE" and "8080" in arg for op, arg in final):
        raise Invalid("dockerfile: the runtime stage must EXPOSE 8080")
    if not any(op == "ENTRYPOINT" and arg.startswith("[") for op, arg in final):
        raise Invalid("dockerfile: ENTRYPOINT must be exec form, so SIGTERM reaches seatsync")
    if any(op == "COPY" and arg.split()[:1] == ["."] for op, arg in instr):
        raise Invalid("dockerfile: `COPY . .` defeats the dependency cache")
    build = instr[froms[0]:froms[-1]]
    copies = [arg for op, arg in build if op == "COPY"]
    first_src = next((i for i, a in enumerate(copies) if a.split()[0] == "src"), None)
    first_lock = next((i for i, a in enumerate(copies) if "Cargo.lock" in a), None)
    if first_lock is None or first_src is None or first_lock > first_src:
        raise Invalid("dockerfile: Cargo.toml/Cargo.lock must be copied (and dependencies built) before src/")
    if not any(op == "FROM" and ("bookworm-slim" in arg or "distroless" in arg) for op, arg in final):
        raise Invalid("dockerfile: the runtime image should be debian:bookworm-slim or distroless")
    ignored = {l.strip().rstrip("/") for l in open(dockerignore) if l.strip() and not l.startswith("#")}
    for must in ("target", ".git", ".seatsync"):
        if must not in ignored:
            raise Invalid(f"dockerfile: {dockerignore} must exclude {must}/")
    print(f"dockerfile: {path}: {len(froms)} stages, dependencies cached before sources, runtime USER {users[-1]}, "
          f"EXPOSE 8080, exec-form ENTRYPOINT; .dockerignore excludes target/ .git/ .seatsync/")


def main():
    check, args = sys.argv[1], sys.argv[2:]
    fn = {
        "k8s": check_k8s,
        "kustomize": check_kustomize,
        "kustomize-fallback": check_kustomize_fallback,
        "nginx-drift": check_nginx_drift,
        "compose": check_compose,
        "grafana": check_grafana,
        "dockerfile": check_dockerfile,
    }[check]
    try:
        fn(*args)
    except Invalid as e:
        print(f"FAILED {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        print(f"FAILED {check}: unexpected structure ({type(e).__name__}: {e})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
