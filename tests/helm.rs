//! The Helm chart (`helm/samtrain`) and the Dockerfile, checked as far as a
//! machine without a cluster or a container engine can: `helm lint --strict`,
//! `helm template` with the default values and with each example values
//! file, every rendered manifest validated against the Kubernetes 1.30
//! schemas (`kubernetes-validate --strict`), the values the manifests carry,
//! the chart refusing bad values by name, and the image agreeing with the
//! chart and with `scripts/setup.sh`.
//!
//! helm comes from `scripts/setup.sh` (`$SAMTRAIN_CACHE/bin/helm`, or set
//! `SAMTRAIN_HELM`); kubernetes-validate and PyYAML from its venv
//! (`SAMTRAIN_PYTHON`, default `<workspace>/.venv/bin/python`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

const RELEASE: &str = "samtrain";
const NAMESPACE: &str = "ml";
const KUBERNETES_VERSION: &str = "1.30";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("helm/samtrain")
}

fn example(name: &str) -> String {
    chart()
        .join("examples")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// helm as `scripts/setup.sh` installs it (same cache directory rule).
fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(find_helm)
}

fn find_helm() -> PathBuf {
    let helm = match std::env::var_os("SAMTRAIN_HELM") {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("SAMTRAIN_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("samtrain"))
            })
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/samtrain")))
            .expect("neither SAMTRAIN_CACHE, XDG_CACHE_HOME nor HOME is set")
            .join("bin/helm"),
    };
    assert!(
        helm.is_file(),
        "helm not found at {}: run scripts/setup.sh, or set SAMTRAIN_HELM",
        helm.display()
    );
    helm
}

/// The venv's python, which has kubernetes-validate and PyYAML.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(find_python)
}

fn find_python() -> PathBuf {
    let python = std::env::var_os("SAMTRAIN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    let out = Command::new(&python)
        .args(["-c", "import kubernetes_validate, yaml"])
        .output();
    assert!(
        matches!(&out, Ok(o) if o.status.success()),
        "{} cannot import kubernetes_validate and yaml: run scripts/setup.sh, or set SAMTRAIN_PYTHON ({out:?})",
        python.display()
    );
    python
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// `helm template` with values files and `--set` pairs: the manifests, or
/// helm's error output.
fn render(values: &[&str], set: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE]);
    for file in values {
        cmd.args(["--values", file]);
    }
    for pair in set {
        cmd.args(["--set", pair]);
    }
    let out = run(&mut cmd);
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn render_ok(values: &[&str]) -> String {
    render(values, &[]).unwrap_or_else(|e| panic!("helm template {values:?} failed:\n{e}"))
}

/// Validates the manifests against the Kubernetes schemas, strictly
/// (unknown fields are errors), from a file as CI would keep it.
fn validate(manifests: &str, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{label}.yaml"));
    std::fs::write(&file, manifests).unwrap();
    let out = run(Command::new(python())
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
        .arg(KUBERNETES_VERSION)
        .arg(&file));
    assert!(
        out.status.success(),
        "{label}: manifests do not validate against Kubernetes {KUBERNETES_VERSION}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The documents of a multi-document YAML stream, as JSON.
fn parse(yaml: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = run(Command::new(python())
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
         json.dump(docs, sys.stdout)",
        )
        .arg(&file));
    assert!(
        out.status.success(),
        "not YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Renders, validates and parses.
fn manifests(values: &[&str], label: &str) -> Vec<Value> {
    let yaml = render_ok(values);
    validate(&yaml, label);
    parse(&yaml)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let all: Vec<String> = docs
                .iter()
                .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
                .collect();
            panic!("no {kind} {name} among {all:?}")
        })
}

fn kinds(docs: &[Value], kind: &str) -> Vec<String> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| {
            e["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no plain value"))
        })
}

fn env_names(container: &Value) -> Vec<String> {
    container["env"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The container port a probe's named port stands for.
fn probe_port(container: &Value, probe: &str) -> (String, u64) {
    let get = &container[probe]["httpGet"];
    let port_name = get["port"].as_str().expect("probes use named ports");
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port_name)
        .unwrap_or_else(|| panic!("{probe} names port {port_name}, which is not declared"))
        ["containerPort"]
        .as_u64()
        .unwrap();
    (get["path"].as_str().unwrap().to_string(), port)
}

fn etcd_members(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!("https://samtrain-etcd-{i}.samtrain-etcd.{NAMESPACE}.svc.cluster.local:2379")
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn lint_is_clean_with_every_values_file() {
    for values in [
        None,
        Some("gpu-bundled-etcd.yaml"),
        Some("external-etcd-s3.yaml"),
        Some("cpu-only.yaml"),
    ] {
        let mut cmd = Command::new(helm());
        cmd.args(["lint", "--strict"]).arg(chart());
        if let Some(file) = values {
            cmd.args(["--values", &example(file)]);
        }
        let out = run(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helm lint --strict with {values:?}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{text}"
        );
    }
}

#[test]
fn default_values_give_two_coordinators_bundled_etcd_and_gpu_workers() {
    let docs = manifests(&[], "default");

    // Coordinator: 2 replicas, probes on the health port, etcd's 3 members.
    let deploy = find(&docs, "Deployment", "samtrain-coordinator");
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(
        deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        "100%"
    );
    let coord = container(deploy, "coordinator");
    assert_eq!(coord["args"][0], "coordinator");
    assert_eq!(
        probe_port(coord, "readinessProbe"),
        ("/readyz".into(), 7071)
    );
    assert_eq!(
        probe_port(coord, "livenessProbe"),
        ("/healthz".into(), 7071)
    );
    assert_eq!(env(coord, "SAMTRAIN_LISTEN"), Some("0.0.0.0:7070"));
    assert_eq!(env(coord, "SAMTRAIN_HEALTH_LISTEN"), Some("0.0.0.0:7071"));
    assert_eq!(env(coord, "SAMTRAIN_NODE_ID"), Some("$(POD_NAME)"));
    assert_eq!(env(coord, "SAMTRAIN_LEASE_TTL"), Some("5"));
    assert_eq!(env(coord, "SAMTRAIN_ETCD"), Some(etcd_members(3).as_str()));
    assert_eq!(env(coord, "SAMTRAIN_ETCD_PREFIX"), Some("/samtrain"));

    // The Service selects exactly the coordinator pods, on the gRPC port.
    let service = find(&docs, "Service", "samtrain-coordinator");
    let pod_labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[key], value, "selector label {key}");
    }
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/component"],
        "coordinator"
    );
    assert_eq!(service["spec"]["ports"][0]["port"], 7070);

    // Workers: a StatefulSet whose headless Service gives stable peer names.
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    assert_eq!(workers["spec"]["replicas"], 2);
    assert_eq!(workers["spec"]["serviceName"], "samtrain-workers");
    let headless = find(&docs, "Service", "samtrain-workers");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    let worker = container(workers, "worker");
    assert_eq!(worker["args"][0], "worker");
    assert_eq!(
        env(worker, "SAMTRAIN_ADVERTISE"),
        Some("$(POD_NAME).samtrain-workers.$(POD_NAMESPACE).svc.cluster.local")
    );
    assert_eq!(
        env(worker, "SAMTRAIN_COORDINATOR"),
        Some("https://samtrain-coordinator.ml.svc.cluster.local:7070")
    );
    assert_eq!(env(worker, "SAMTRAIN_NAME"), Some("$(POD_NAME)"));
    assert_eq!(env(worker, "SAMTRAIN_COLLECTIVE_PORT"), Some("29500"));
    assert_eq!(env(worker, "SAMTRAIN_DEVICE"), Some("auto"));
    assert_eq!(env(worker, "SAMTRAIN_ETCD"), Some(etcd_members(3).as_str()));
    assert_eq!(
        probe_port(worker, "readinessProbe"),
        ("/readyz".into(), 7072)
    );
    assert_eq!(
        probe_port(worker, "livenessProbe"),
        ("/healthz".into(), 7072)
    );
    assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], 1);
    // /dev/shm is memory-backed and sized from values.
    let shm = workers["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "shm")
        .unwrap();
    assert_eq!(shm["emptyDir"]["medium"], "Memory");
    assert_eq!(shm["emptyDir"]["sizeLimit"], "8Gi");

    // Bundled etcd: 3 members with persistent volumes, forming one cluster.
    let etcd = find(&docs, "StatefulSet", "samtrain-etcd");
    assert_eq!(etcd["spec"]["replicas"], 3);
    assert_eq!(etcd["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(
        etcd["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "8Gi"
    );
    let etcd_args: Vec<&str> = container(etcd, "etcd")["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let cluster = etcd_args
        .iter()
        .find_map(|a| a.strip_prefix("--initial-cluster="))
        .expect("--initial-cluster");
    assert_eq!(cluster.split(',').count(), 3, "{cluster}");
    assert!(cluster.starts_with(
        "samtrain-etcd-0=http://samtrain-etcd-0.samtrain-etcd.ml.svc.cluster.local:2380,"
    ));
    assert_eq!(
        find(&docs, "Service", "samtrain-etcd")["spec"]["clusterIP"],
        "None"
    );

    // Disruption budgets: workers one at a time, etcd keeps its quorum; none
    // for the coordinator, whose standby is never Ready.
    assert_eq!(
        find(&docs, "PodDisruptionBudget", "samtrain-workers")["spec"]["maxUnavailable"],
        1
    );
    assert_eq!(
        find(&docs, "PodDisruptionBudget", "samtrain-etcd")["spec"]["minAvailable"],
        2
    );
    assert_eq!(kinds(&docs, "PodDisruptionBudget").len(), 2);

    // No Kubernetes API rights at all: no roles, no token in the pods.
    for kind in ["Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"] {
        assert!(kinds(&docs, kind).is_empty(), "unexpected {kind}");
    }
    assert_eq!(
        find(&docs, "ServiceAccount", "samtrain")["automountServiceAccountToken"],
        false
    );
    for workload in [deploy, workers, etcd] {
        let pod = &workload["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "samtrain");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], 10001);
        for c in pod["containers"].as_array().unwrap() {
            assert!(
                c["resources"]["requests"].is_object(),
                "{} requests",
                c["name"]
            );
            assert!(c["resources"]["limits"].is_object(), "{} limits", c["name"]);
        }
    }

    // Without job specs there is nothing to submit: the one Job turns the
    // bundled etcd's auth on. The Secrets hold the API's tokens, etcd's
    // certificates and password, and the API's TLS files.
    assert!(kinds(&docs, "ConfigMap").is_empty());
    assert_eq!(kinds(&docs, "Job"), ["samtrain-etcd-auth"]);
    assert_eq!(
        kinds(&docs, "Secret"),
        ["samtrain-auth", "samtrain-etcd-credentials", "samtrain-tls"]
    );
}

/// A Secret's key, decoded.
fn secret_file(secret: &Value, key: &str) -> Vec<u8> {
    use base64::Engine;
    let data = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no key {key}"));
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .unwrap()
}

/// The API over TLS and the bundled etcd over TLS with auth, by default:
/// every pod gets the files and settings of its role, and the certificate
/// the chart makes is one `samtrain coordinator` serves and a client
/// calling the Service's name trusts, with and without mutual TLS.
#[test]
fn tls_and_etcd_credentials_come_from_secrets_the_binary_accepts() {
    let docs = manifests(&[], "defaults (tls)");
    let coord_deploy = find(&docs, "Deployment", "samtrain-coordinator");
    let coord = container(coord_deploy, "coordinator");
    assert_eq!(
        env(coord, "SAMTRAIN_TLS_CERT"),
        Some("/etc/samtrain/tls/tls.crt")
    );
    assert_eq!(
        env(coord, "SAMTRAIN_TLS_KEY"),
        Some("/etc/samtrain/tls/tls.key")
    );
    assert_eq!(env(coord, "SAMTRAIN_TLS_CLIENT_CA"), None);
    assert_eq!(env(coord, "SAMTRAIN_INSECURE"), None);
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    let worker = container(workers, "worker");
    assert_eq!(
        env(worker, "SAMTRAIN_TLS_CA"),
        Some("/etc/samtrain/tls/ca.crt")
    );
    assert_eq!(env(worker, "SAMTRAIN_TLS_CLIENT_CERT"), None);
    for c in [coord, worker] {
        assert_eq!(
            env(c, "SAMTRAIN_ETCD_CA"),
            Some("/etc/samtrain/etcd/ca.crt")
        );
        assert_eq!(env(c, "SAMTRAIN_ETCD_USER"), Some("root"));
    }
    let etcd = container(find(&docs, "StatefulSet", "samtrain-etcd"), "etcd");
    let args = etcd["command"].as_array().unwrap();
    for flag in [
        "--client-cert-auth",
        "--listen-client-urls=https://0.0.0.0:2379",
    ] {
        assert!(args.iter().any(|a| a == flag), "etcd lacks {flag}");
    }
    let hook = container(find(&docs, "Job", "samtrain-etcd-auth"), "enable-auth");
    assert_eq!(hook["args"][0], "etcd");
    assert_eq!(hook["args"][1], "enable-auth");
    let out =
        run(Command::new(env!("CARGO_BIN_EXE_samtrain")).args(["etcd", "enable-auth", "--help"]));
    let help = String::from_utf8(out.stdout).unwrap();
    for var in env_names(hook)
        .iter()
        .filter(|v| v.starts_with("SAMTRAIN_"))
    {
        assert!(
            help.contains(&format!("env: {var}")),
            "the hook sets {var}, unread"
        );
    }

    // The chart's certificate, served by the binary, trusted by name.
    let dir = tempfile::tempdir().unwrap();
    let tls = find(&docs, "Secret", "samtrain-tls");
    for key in ["ca.crt", "tls.crt", "tls.key", "client.crt", "client.key"] {
        std::fs::write(dir.path().join(key), secret_file(tls, key)).unwrap();
    }
    std::fs::write(dir.path().join("tokens"), "a-token-of-at-least-16-chars\n").unwrap();
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    for mutual in [false, true] {
        let port = samtrain_testkit::free_port();
        let mut coordinator = Command::new(env!("CARGO_BIN_EXE_samtrain"));
        coordinator
            .arg("coordinator")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--health-listen", "127.0.0.1:0"])
            .args([
                "--tls-cert",
                &file("tls.crt"),
                "--tls-key",
                &file("tls.key"),
            ])
            .args([
                "--operator-tokens",
                &file("tokens"),
                "--worker-tokens",
                &file("tokens"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if mutual {
            coordinator.args(["--tls-client-ca", &file("ca.crt")]);
        }
        let mut coordinator = coordinator.spawn().unwrap();
        samtrain_testkit::wait_for_port(port, "coordinator", Duration::from_secs(20));
        let mut list = Command::new(env!("CARGO_BIN_EXE_samtrain"));
        list.args(["list", "--coordinator", &format!("127.0.0.1:{port}")])
            .args(["--tls-ca", &file("ca.crt")])
            .args([
                "--tls-server-name",
                &format!("samtrain-coordinator.{NAMESPACE}.svc.cluster.local"),
            ])
            .args(["--token-file", &file("tokens")]);
        if mutual {
            list.args(["--tls-client-cert", &file("client.crt")])
                .args(["--tls-client-key", &file("client.key")]);
        }
        let out = list.output().unwrap();
        coordinator.kill().unwrap();
        coordinator.wait().unwrap();
        assert!(
            out.status.success(),
            "mutual {mutual}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Mutual TLS gives clients a certificate; turning TLS off is explicit.
    let mutual = parse(&render(&[], &["tls.mutual=true"]).unwrap());
    let coord = container(
        find(&mutual, "Deployment", "samtrain-coordinator"),
        "coordinator",
    );
    assert_eq!(
        env(coord, "SAMTRAIN_TLS_CLIENT_CA"),
        Some("/etc/samtrain/tls/ca.crt")
    );
    let worker = container(find(&mutual, "StatefulSet", "samtrain-workers"), "worker");
    assert_eq!(
        env(worker, "SAMTRAIN_TLS_CLIENT_CERT"),
        Some("/etc/samtrain/tls/client.crt")
    );
    let err = render(
        &[],
        &["tls.mutual=true", "tls.existingSecret=from-cert-manager"],
    )
    .expect_err("mutual TLS without the clients' Secret");
    assert!(err.contains("tls.clientSecret"), "{err}");
    let plain = parse(&render(&[], &["tls.enabled=false"]).unwrap());
    let coord = container(
        find(&plain, "Deployment", "samtrain-coordinator"),
        "coordinator",
    );
    assert_eq!(env(coord, "SAMTRAIN_INSECURE"), Some("true"));
    assert_eq!(env(coord, "SAMTRAIN_TLS_CERT"), None);
}

/// Whether `selector`'s matchLabels all hold on `workload`'s pods.
fn selects(selector: &Value, workload: &Value) -> bool {
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    selector["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

#[test]
fn network_policies_close_the_api_the_ring_and_etcd() {
    let docs = manifests(&[], "defaults (network policies)");
    let coordinator = find(&docs, "Deployment", "samtrain-coordinator");
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    let etcd = find(&docs, "StatefulSet", "samtrain-etcd");
    let rules = |name: &str| -> Vec<(u64, Vec<Value>)> {
        let policy = find(&docs, "NetworkPolicy", name);
        policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let from = r["from"].as_array().cloned().unwrap_or_default();
                (r["ports"][0]["port"].as_u64().unwrap(), from)
            })
            .collect()
    };
    let from_pods = |from: &[Value], workload: &Value| {
        from.iter().any(|f| selects(&f["podSelector"], workload))
    };

    let policy = find(&docs, "NetworkPolicy", "samtrain-coordinator");
    assert!(selects(&policy["spec"]["podSelector"], coordinator));
    let api = rules("samtrain-coordinator");
    assert_eq!(api[0].0, 7070);
    assert!(from_pods(&api[0].1, workers));
    assert!(!from_pods(&api[0].1, etcd));
    assert_eq!((api[1].0, api[1].1.is_empty()), (7071, true), "probes");

    let ring = rules("samtrain-workers");
    assert_eq!(ring[0].0, 29500);
    assert!(from_pods(&ring[0].1, workers));
    assert!(!from_pods(&ring[0].1, coordinator));
    assert_eq!(ring[0].1.len(), 1, "only workers reach the ring");

    let store = rules("samtrain-etcd");
    assert_eq!(store[0].0, 2379);
    assert!(from_pods(&store[0].1, coordinator) && from_pods(&store[0].1, workers));
    assert_eq!((store[1].0, store[1].1.is_empty()), (2381, true), "probes");
    assert_eq!(store[2].0, 2380);
    assert!(from_pods(&store[2].1, etcd) && !from_pods(&store[2].1, workers));

    // Turned off, there are none.
    let open = parse(&render(&[], &["networkPolicy.enabled=false"]).unwrap());
    assert!(kinds(&open, "NetworkPolicy").is_empty());
}

/// The pod's volume named `name`.
fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The keys of the auth Secret a workload mounts.
fn mounted_keys(workload: &Value) -> Vec<String> {
    volume(workload, "auth")["secret"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_api_takes_tokens_from_a_secret_each_role_its_own() {
    let docs = manifests(
        &[&example("gpu-bundled-etcd.yaml")],
        "gpu-bundled-etcd (auth)",
    );
    let secret = find(&docs, "Secret", "samtrain-auth");
    for key in ["operator-tokens", "worker-tokens", "metrics-token"] {
        let token = secret["data"][key].as_str().unwrap();
        assert!(token.len() >= 48, "{key} is a long random token");
    }
    let deploy = find(&docs, "Deployment", "samtrain-coordinator");
    let coord = container(deploy, "coordinator");
    assert_eq!(
        env(coord, "SAMTRAIN_OPERATOR_TOKENS_FILE"),
        Some("/etc/samtrain/auth/operator-tokens")
    );
    assert_eq!(
        env(coord, "SAMTRAIN_WORKER_TOKENS_FILE"),
        Some("/etc/samtrain/auth/worker-tokens")
    );
    assert_eq!(env(coord, "SAMTRAIN_INSECURE"), None);
    assert_eq!(
        mounted_keys(deploy),
        ["operator-tokens", "worker-tokens", "metrics-token"]
    );
    // Workers hold only the worker token; the submit hook only the operator's.
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    assert_eq!(
        env(container(workers, "worker"), "SAMTRAIN_TOKEN_FILE"),
        Some("/etc/samtrain/auth/worker-tokens")
    );
    assert_eq!(mounted_keys(workers), ["worker-tokens", "metrics-token"]);
    let hook = find(&docs, "Job", "samtrain-submit");
    assert_eq!(mounted_keys(hook), ["operator-tokens"]);

    // An existing Secret replaces the chart's; turning auth off is explicit.
    let existing = render(
        &[&example("gpu-bundled-etcd.yaml")],
        &["auth.existingSecret=team-tokens"],
    )
    .unwrap();
    let docs = parse(&existing);
    assert!(!kinds(&docs, "Secret").contains(&"samtrain-auth".to_owned()));
    let deploy = find(&docs, "Deployment", "samtrain-coordinator");
    assert_eq!(
        volume(deploy, "auth")["secret"]["secretName"],
        "team-tokens"
    );
    let open = parse(
        &render(
            &[&example("gpu-bundled-etcd.yaml")],
            &["auth.enabled=false"],
        )
        .unwrap(),
    );
    let coord = container(
        find(&open, "Deployment", "samtrain-coordinator"),
        "coordinator",
    );
    assert_eq!(env(coord, "SAMTRAIN_INSECURE"), Some("true"));
    assert_eq!(env(coord, "SAMTRAIN_OPERATOR_TOKENS_FILE"), None);
}

/// Prometheus: scrape annotations on the pods, `/metrics` behind the
/// metrics token of the auth Secret, and an optional ServiceMonitor per
/// component that presents it.
#[test]
fn metrics_are_scraped_with_the_token_of_the_auth_secret() {
    let docs = manifests(&[], "default (metrics)");
    for (kind, name, container_name, port) in [
        ("Deployment", "samtrain-coordinator", "coordinator", "7071"),
        ("StatefulSet", "samtrain-workers", "worker", "7072"),
    ] {
        let workload = find(&docs, kind, name);
        let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(annotations["prometheus.io/port"], port, "{name}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{name}");
        assert_eq!(
            env(
                container(workload, container_name),
                "SAMTRAIN_METRICS_TOKEN_FILE"
            ),
            Some("/etc/samtrain/auth/metrics-token"),
            "{name}"
        );
        assert!(mounted_keys(workload).contains(&"metrics-token".to_owned()));
    }
    let service = find(&docs, "Service", "samtrain-coordinator");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "health" && p["port"] == 7071),
        "{service}"
    );
    assert!(kinds(&docs, "ServiceMonitor").is_empty());

    // ServiceMonitors are opt-in (their CRD is not Kubernetes', so they are
    // checked here rather than by the schema validation).
    let docs = parse(
        &render(
            &[],
            &[
                "metrics.serviceMonitor.enabled=true",
                "metrics.serviceMonitor.labels.release=kube-prometheus",
            ],
        )
        .unwrap(),
    );
    for (name, component) in [
        ("samtrain-coordinator", "coordinator"),
        ("samtrain-worker", "worker"),
    ] {
        let monitor = find(&docs, "ServiceMonitor", name);
        assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus");
        assert_eq!(
            monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            component
        );
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], "health");
        assert_eq!(endpoint["path"], "/metrics");
        assert_eq!(
            endpoint["authorization"]["credentials"]["name"],
            "samtrain-auth"
        );
        assert_eq!(
            endpoint["authorization"]["credentials"]["key"],
            "metrics-token"
        );
    }
    let refused = render(
        &[],
        &["metrics.serviceMonitor.enabled=true", "auth.enabled=false"],
    )
    .unwrap_err();
    assert!(refused.contains("needs auth.enabled"), "{refused}");
    let open =
        parse(&render(&[], &["auth.enabled=false", "metrics.podAnnotations=false"]).unwrap());
    let deploy = find(&open, "Deployment", "samtrain-coordinator");
    assert_eq!(
        env(
            container(deploy, "coordinator"),
            "SAMTRAIN_METRICS_TOKEN_FILE"
        ),
        None
    );
    assert!(
        deploy["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"].is_null()
    );
}

/// Eight GPUs per pod: a pod is a node, running a rank process per GPU
/// (`--slots` through SAMTRAIN_SLOTS) on eight collective ports the network
/// policy opens, one pod per Kubernetes node, NCCL settings passed through,
/// and the node's network when asked.
#[test]
fn a_pod_with_eight_gpus_is_a_node_of_eight_slots() {
    let yaml = render(
        &[],
        &[
            "workers.gpusPerPod=8",
            "workers.ncclEnv.NCCL_SOCKET_IFNAME=eth0",
            "workers.hostNetwork=true",
        ],
    )
    .unwrap();
    validate(&yaml, "eight GPUs per pod");
    let docs = parse(&yaml);
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    let c = container(workers, "worker");
    assert_eq!(env(c, "SAMTRAIN_SLOTS"), Some("8"));
    assert_eq!(env(c, "NCCL_SOCKET_IFNAME"), Some("eth0"));
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], 8);
    let pod = &workers["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert!(selects(&anti["labelSelector"], workers), "{anti}");
    let policy = find(&docs, "NetworkPolicy", "samtrain-workers");
    let ring = &policy["spec"]["ingress"][0]["ports"][0];
    assert_eq!(
        (ring["port"].as_u64(), ring["endPort"].as_u64()),
        (Some(29500), Some(29507))
    );
    // One GPU per pod (the default): one slot, no anti-affinity.
    let docs = manifests(&[], "default (one slot)");
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    assert_eq!(
        env(container(workers, "worker"), "SAMTRAIN_SLOTS"),
        Some("1")
    );
    assert!(workers["spec"]["template"]["spec"]["affinity"].is_null());
    // NCCL settings only, by name.
    let err = render(&[], &["workers.ncclEnv.LD_PRELOAD=/x.so"]).expect_err("rendered");
    assert!(
        err.contains("'LD_PRELOAD' does not match pattern '^NCCL_"),
        "{err}"
    );
}

/// Workers name the Kubernetes node they run on, so the rendezvous keeps
/// each tensor-parallel group inside one node.
#[test]
fn workers_name_their_kubernetes_node() {
    let docs = manifests(&[], "default (nodes)");
    let workers = container(find(&docs, "StatefulSet", "samtrain-workers"), "worker");
    let node = workers["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SAMTRAIN_NODE")
        .unwrap_or_else(|| panic!("{workers}"));
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
}

#[test]
fn traces_go_to_the_collector_the_values_name() {
    let docs = manifests(&[], "default (no traces)");
    let coordinator = find(&docs, "Deployment", "samtrain-coordinator");
    assert_eq!(
        env(
            container(coordinator, "coordinator"),
            "SAMTRAIN_OTLP_ENDPOINT"
        ),
        None
    );
    let docs = parse(&render(&[], &["log.otlpEndpoint=http://otel-collector:4318"]).unwrap());
    for (kind, name, container_name) in [
        ("Deployment", "samtrain-coordinator", "coordinator"),
        ("StatefulSet", "samtrain-workers", "worker"),
    ] {
        assert_eq!(
            env(
                container(find(&docs, kind, name), container_name),
                "SAMTRAIN_OTLP_ENDPOINT"
            ),
            Some("http://otel-collector:4318"),
            "{name}"
        );
    }
    // The binary posts over plain HTTP only: the schema says so first.
    let err = render(&[], &["log.otlpEndpoint=https://otel-collector:4318"])
        .expect_err("an https endpoint rendered");
    assert!(err.contains("at '/log/otlpEndpoint'"), "{err}");
}

#[test]
fn gpu_example_requests_gpus_and_submits_its_job() {
    let docs = manifests(&[&example("gpu-bundled-etcd.yaml")], "gpu-bundled-etcd");
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    assert_eq!(workers["spec"]["replicas"], 8);
    let pod = &workers["spec"]["template"]["spec"];
    let worker = container(workers, "worker");
    assert_eq!(worker["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert_eq!(worker["resources"]["limits"]["memory"], "160Gi");
    assert_eq!(env(worker, "SAMTRAIN_DEVICE"), Some("cuda"));
    assert_eq!(env(worker, "NCCL_DEBUG"), Some("WARN"));
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0],
        "NVIDIA-H100-80GB-HBM3"
    );
    let mounts: Vec<&str> = worker["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert_eq!(
        mounts,
        [
            "/dev/shm",
            "/var/lib/samtrain",
            "/tmp",
            "/etc/samtrain/auth",
            "/etc/samtrain/tls",
            "/etc/samtrain/etcd",
            "/models"
        ]
    );
    assert_eq!(worker["envFrom"][0]["secretRef"]["name"], "samtrain-gcs");

    let etcd = find(&docs, "StatefulSet", "samtrain-etcd");
    let claim = &etcd["spec"]["volumeClaimTemplates"][0]["spec"];
    assert_eq!(claim["storageClassName"], "premium-rwo");
    assert_eq!(claim["resources"]["requests"]["storage"], "20Gi");

    // The spec is in the ConfigMap, which the hook and the coordinators mount.
    let jobs = find(&docs, "ConfigMap", "samtrain-jobs");
    let spec = jobs["data"]["group-captioning.toml"].as_str().unwrap();
    assert!(spec.starts_with("name = \"group-captioning\"\n"), "{spec}");
    assert!(
        spec.contains("min_workers = 4\nmax_workers = 8\n"),
        "{spec}"
    );
    let hook = find(&docs, "Job", "samtrain-submit");
    assert_eq!(
        hook["metadata"]["annotations"]["helm.sh/hook"],
        "post-install"
    );
    let submit = container(hook, "submit");
    assert!(submit["command"][2]
        .as_str()
        .unwrap()
        .contains("samtrain submit \"$spec\""));
    assert_eq!(
        env(submit, "SAMTRAIN_COORDINATOR"),
        Some("https://samtrain-coordinator.ml.svc.cluster.local:7070")
    );
    assert_eq!(volume(hook, "jobs")["configMap"]["name"], "samtrain-jobs");
    let deploy = find(&docs, "Deployment", "samtrain-coordinator");
    let jobs_mount = container(deploy, "coordinator")["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "jobs")
        .unwrap()["mountPath"]
        .clone();
    assert_eq!(jobs_mount, "/jobs");
}

#[test]
fn external_etcd_example_uses_its_endpoints_and_s3_secret() {
    let docs = manifests(&[&example("external-etcd-s3.yaml")], "external-etcd-s3");
    assert!(kinds(&docs, "StatefulSet") == ["samtrain-workers"]);
    assert!(kinds(&docs, "PodDisruptionBudget") == ["samtrain-workers"]);
    assert!(!kinds(&docs, "Service").contains(&"samtrain-etcd".to_string()));
    // The object store's Secret is the user's: the chart makes only the
    // API's tokens and TLS files.
    assert_eq!(kinds(&docs, "Secret"), ["samtrain-auth", "samtrain-tls"]);

    let endpoints = "http://etcd-0.etcd.platform.svc.cluster.local:2379,\
                     http://etcd-1.etcd.platform.svc.cluster.local:2379,\
                     http://etcd-2.etcd.platform.svc.cluster.local:2379";
    let deploy = find(&docs, "Deployment", "samtrain-coordinator");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    for c in [
        container(deploy, "coordinator"),
        container(workers, "worker"),
    ] {
        assert_eq!(env(c, "SAMTRAIN_ETCD"), Some(endpoints));
        assert_eq!(env(c, "SAMTRAIN_ETCD_PREFIX"), Some("/samtrain/research"));
        assert_eq!(env(c, "AWS_REGION"), Some("eu-west-1"));
        assert_eq!(
            env(c, "AWS_ENDPOINT"),
            Some("http://seaweedfs-s3.storage.svc.cluster.local:8333")
        );
        assert_eq!(env(c, "AWS_ALLOW_HTTP"), Some("true"));
        assert_eq!(c["envFrom"][0]["secretRef"]["name"], "samtrain-s3");
    }
    // Jobs may make these workers write only to the bucket and the scratch.
    assert_eq!(
        env(container(workers, "worker"), "SAMTRAIN_ALLOW_WRITE"),
        Some("s3://checkpoints,/var/lib/samtrain")
    );
}

#[test]
fn cpu_example_has_no_gpus_and_no_etcd() {
    let yaml = render_ok(&[&example("cpu-only.yaml")]);
    assert!(
        !yaml.contains("nvidia.com/gpu"),
        "a GPU request in:\n{yaml}"
    );
    validate(&yaml, "cpu-only");
    let docs = parse(&yaml);

    let deploy = find(&docs, "Deployment", "samtrain-coordinator");
    assert_eq!(deploy["spec"]["replicas"], 1);
    let workers = find(&docs, "StatefulSet", "samtrain-workers");
    let worker = container(workers, "worker");
    assert_eq!(env(worker, "SAMTRAIN_DEVICE"), Some("cpu"));
    assert_eq!(worker["resources"]["limits"]["cpu"], "2");
    // No etcd: the coordinator's embedded store, and no etcd objects.
    for c in [container(deploy, "coordinator"), worker] {
        let names = env_names(c);
        assert!(
            !names.iter().any(|n| n.starts_with("SAMTRAIN_ETCD")),
            "{names:?}"
        );
    }
    assert!(kinds(&docs, "StatefulSet") == ["samtrain-workers"]);

    // Credentials given as values go into a Secret the chart makes.
    let secret = find(&docs, "Secret", "samtrain-object-store");
    assert_eq!(secret["stringData"]["AWS_ACCESS_KEY_ID"], "samtrain");
    assert_eq!(
        worker["envFrom"][0]["secretRef"]["name"],
        "samtrain-object-store"
    );
    assert!(
        find(&docs, "ConfigMap", "samtrain-jobs")["data"]["demo.toml"]
            .as_str()
            .unwrap()
            .contains("device = \"cpu\"")
    );
}

#[test]
fn bad_values_are_refused_with_the_field_named() {
    // A values file with two mistakes: the schema lists both.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "workers:\n  device: tpu\n  gpusPerPod: -1\ncoordinator:\n  replicas: 2\n  leaseTtl: 5\n",
    )
    .unwrap();
    let err = render(&[bad.to_str().unwrap()], &[]).expect_err("bad values rendered");
    assert!(
        err.contains("values don't meet the specifications of the schema"),
        "{err}"
    );
    assert!(
        err.contains("at '/workers/device': value must be one of 'auto', 'cuda', 'cpu'"),
        "{err}"
    );
    assert!(err.contains("at '/workers/gpusPerPod'"), "{err}");
    assert!(
        err.contains("at '/coordinator': additional properties 'leaseTtl' not allowed"),
        "{err}"
    );

    // One mistake at a time: (--set, what the refusal must say).
    let cases: &[(&[&str], &str)] = &[
        (&["etcd.mode=zookeeper"], "at '/etcd/mode'"),
        (
            &["etcd.bundled.replicas=2"],
            "at '/etcd/bundled/replicas': value must be one of 1, 3, 5, 7",
        ),
        (
            &["workers.shmSize=lots"],
            "at '/workers/shmSize': 'lots' does not match pattern",
        ),
        (
            &["workers.resources.limits.memory=lots"],
            "at '/workers/resources/limits/memory'",
        ),
        (&["coordinator.replicas=0"], "at '/coordinator/replicas'"),
        (&["coordinator.port=70000"], "at '/coordinator/port'"),
        (&["etcd.prefix=samtrain"], "at '/etcd/prefix'"),
        (
            &["objectStore.credentials.aws_secret=x"],
            "at '/objectStore/credentials': additional properties 'aws_secret' not allowed",
        ),
        (
            &["etcd.mode=external", "etcd.external.endpoints[0]=etcd:2379"],
            "at '/etcd/external/endpoints/0'",
        ),
        (
            &["jobs.Demo_Job=x"],
            "at '/jobs': additional properties 'Demo_Job' not allowed",
        ),
        // Mistakes across values, which the templates refuse.
        (
            &["etcd.mode=none"],
            "coordinator.replicas is 2 but etcd.mode is \"none\"",
        ),
        (&["etcd.mode=external"], "etcd.external.endpoints is empty"),
        (
            &["workers.device=cuda", "workers.gpusPerPod=0"],
            "workers.gpusPerPod is 0",
        ),
        (
            &["workers.device=cpu"],
            "workers.device is \"cpu\" but workers.gpusPerPod is 1",
        ),
        (
            &["workers.gpus=8"],
            "workers.gpus was renamed workers.gpusPerPod",
        ),
        (
            &[
                "objectStore.existingSecret=s3",
                "objectStore.credentials.AWS_ACCESS_KEY_ID=k",
            ],
            "objectStore.existingSecret and objectStore.credentials are both set",
        ),
    ];
    for (set, message) in cases {
        let err = render(&[], set).expect_err(&format!("{set:?} rendered"));
        assert!(
            err.contains(message),
            "{set:?}: expected {message:?} in:\n{err}"
        );
    }
}

#[test]
fn notes_say_how_to_submit_and_watch() {
    let out = run(Command::new(helm())
        .args(["install", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE, "--dry-run=client", "--values"])
        .arg(example("cpu-only.yaml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let notes = text.split_once("NOTES:").expect("NOTES").1;
    for line in [
        "kubectl -n ml exec deploy/samtrain-coordinator -- samtrain submit /jobs/demo.toml",
        "kubectl -n ml port-forward svc/samtrain-coordinator 7070:7070",
        "kubectl -n ml exec deploy/samtrain-coordinator -- samtrain watch JOB",
        "kubectl -n ml exec deploy/samtrain-coordinator -- samtrain status JOB",
        "kubectl -n ml logs job/samtrain-submit",
        "etcd: none",
    ] {
        assert!(notes.contains(line), "{line:?} not in NOTES:\n{notes}");
    }
}

/// The values of `values.yaml`, as JSON.
fn default_values() -> Value {
    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    parse(&text).remove(0)
}

/// `NAME=value` of a shell assignment or Dockerfile ARG, unquoted.
fn assignment<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?}"))
        .trim()
        .trim_matches('"')
}

#[test]
fn image_agrees_with_the_chart_and_setup() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let setup = std::fs::read_to_string(root().join("scripts/setup.sh")).unwrap();
    // The image's libtorch is the one tch is built against here.
    assert_eq!(
        assignment(&dockerfile, "ARG TORCH_VERSION="),
        assignment(&setup, "TORCH_VERSION=")
    );

    // It exposes the chart's default ports.
    let values = default_values();
    let exposed: Vec<u64> = assignment(&dockerfile, "EXPOSE ")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    for port in [
        &values["coordinator"]["port"],
        &values["coordinator"]["healthPort"],
        &values["workers"]["healthPort"],
        &values["workers"]["collectivePort"],
    ] {
        assert!(
            exposed.contains(&port.as_u64().unwrap()),
            "{port} not exposed"
        );
    }

    // It runs as the user the chart's pods require, with samtrain as the
    // entry point the chart's `args` follow (and on PATH for the hook).
    assert_eq!(assignment(&dockerfile, "USER "), "10001:10001");
    let yaml = render_ok(&[]);
    assert!(yaml.contains("runAsUser: 10001"));
    assert_eq!(
        assignment(&dockerfile, "ENTRYPOINT "),
        r#"["/usr/bin/tini", "--", "/usr/local/bin/samtrain"]"#
    );
    assert!(dockerfile.contains("install -D -m 0755 target/release/samtrain /out/bin/samtrain"));
    assert!(dockerfile.contains("COPY --from=build /out/bin/samtrain /usr/local/bin/samtrain"));

    // The build context keeps what the build needs.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    for needed in ["Cargo.toml", "Cargo.lock", ".cargo", "proto", "src"] {
        assert!(!ignored.contains(&needed), "{needed} is in .dockerignore");
    }
    assert!(Path::new(&root().join(".cargo/config.toml")).is_file());
}

/// Every `SAMTRAIN_*` variable the chart gives a container is one the
/// binary's subcommand for that container reads (`[env: ...]` in its help),
/// so a renamed flag cannot silently drop a setting in the cluster.
#[test]
fn chart_settings_are_flags_the_binary_reads() {
    let docs = manifests(
        &[&example("external-etcd-s3.yaml")],
        "external-etcd-s3 (flags)",
    );
    let help = |command: &str| {
        let out = run(Command::new(env!("CARGO_BIN_EXE_samtrain")).args([command, "--help"]));
        String::from_utf8(out.stdout).unwrap()
    };
    for (kind, name, container_name, command) in [
        (
            "Deployment",
            "samtrain-coordinator",
            "coordinator",
            "coordinator",
        ),
        ("StatefulSet", "samtrain-workers", "worker", "worker"),
    ] {
        let c = container(find(&docs, kind, name), container_name);
        assert_eq!(c["args"][0], command, "{name} runs `samtrain {command}`");
        let help = help(command);
        for var in env_names(c).iter().filter(|v| v.starts_with("SAMTRAIN_")) {
            // The CLI of `samtrain submit` inside the pod reads this one.
            let for_the_cli = [
                "SAMTRAIN_COORDINATOR",
                "SAMTRAIN_TOKEN_FILE",
                "SAMTRAIN_TLS_CA",
                "SAMTRAIN_TLS_CLIENT_CERT",
                "SAMTRAIN_TLS_CLIENT_KEY",
            ];
            if for_the_cli.contains(&var.as_str()) && command == "coordinator" {
                continue;
            }
            assert!(
                help.contains(&format!("env: {var}")),
                "{name} sets {var}, which `samtrain {command}` does not read"
            );
        }
    }
}
