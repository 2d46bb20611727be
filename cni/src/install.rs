//! `outrider cni install`: the node agent (a DaemonSet, `deploy/cni.yaml`). It copies the binary
//! into the host's CNI bin directory as `outrider-cni`, writes the plugin's kubeconfig (the
//! DaemonSet's ServiceAccount token, which may only `get` pods), inserts the plugin at the end of
//! the chain of the node's active network config (the first `.conf`/`.conflist`/`.json` file in
//! name order, as runtimes choose it; a single `.conf` is wrapped into a `.conflist`), then polls
//! the directory and inserts itself again whenever another CNI rewrites the file. On SIGTERM or
//! SIGINT it removes exactly what it added.
//!
//! Every write is atomic (a temporary file in the same directory, then a rename). Every other
//! plugin, and every key, keeps its bytes and its order: the file is parsed only at the top
//! level and the `plugins` list, each value kept as raw JSON. Removal restores the original file
//! byte for byte when nobody changed it since our insertion; after another CNI's rewrite it
//! removes only our entry. The directory is polled (every `--poll-ms`) rather than watched with
//! inotify: one `read_dir` and one small read per interval, and no extra crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::PLUGIN_NAME;

/// Flags of `outrider cni install`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// The host's CNI bin directory, as mounted in this container.
    #[arg(long, value_name = "DIR", default_value = "/host/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The host's CNI config directory, as mounted in this container.
    #[arg(long, value_name = "DIR", default_value = "/host/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The same config directory as the host sees it (the plugin runs on the host).
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub host_conf_dir: PathBuf,
    /// The API server for the plugin's kubeconfig (default: from KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, value_name = "URL")]
    pub api_server: Option<String>,
    /// The ServiceAccount directory (token, ca.crt) whose credentials the plugin uses.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount"
    )]
    pub service_account_dir: PathBuf,
    /// How often the config directory is checked for rewrites, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub poll_ms: u64,
}

/// A JSON object kept as (key, raw value) pairs in file order.
struct Object(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v));
                }
                Ok(Object(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Object {
    fn parse(text: &str) -> Result<Object, String> {
        let mut de = serde_json::Deserializer::from_str(text);
        let obj = serde::Deserialize::deserialize(&mut de).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(obj)
    }

    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref())
    }

    fn render(&self, plugins: Option<&[Box<RawValue>]>) -> String {
        let mut out = String::from("{\n");
        for (i, (k, v)) in self.0.iter().enumerate() {
            let key = serde_json::Value::String(k.clone()).to_string();
            match (k.as_str(), plugins) {
                ("plugins", Some(list)) => {
                    out.push_str(&format!("  {key}: [\n"));
                    for (j, p) in list.iter().enumerate() {
                        let sep = if j + 1 < list.len() { "," } else { "" };
                        out.push_str(&format!("    {}{sep}\n", p.get()));
                    }
                    out.push_str("  ]");
                }
                _ => out.push_str(&format!("  {key}: {}", v.get())),
            }
            out.push_str(if i + 1 < self.0.len() { ",\n" } else { "\n" });
        }
        out.push_str("}\n");
        out
    }
}

fn is_ours(plugin: &RawValue) -> bool {
    #[derive(serde::Deserialize)]
    struct Type {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    serde_json::from_str::<Type>(plugin.get()).is_ok_and(|t| t.kind.as_deref() == Some(PLUGIN_NAME))
}

/// Our entry in the chain.
pub fn plugin_entry(kubeconfig: &Path) -> String {
    serde_json::json!({"type": PLUGIN_NAME, "kubeconfig": kubeconfig}).to_string()
}

/// The conflist with our entry appended to `plugins`; `Ok(None)` when it is already there.
pub fn insert(conflist: &str, entry: &str) -> Result<Option<String>, String> {
    let obj = Object::parse(conflist)?;
    let plugins: Vec<Box<RawValue>> = serde_json::from_str(
        obj.get("plugins")
            .ok_or("the conflist has no `plugins` list")?
            .get(),
    )
    .map_err(|e| format!("`plugins` is not a list: {e}"))?;
    if plugins.iter().any(|p| is_ours(p)) {
        return Ok(None);
    }
    let mut list = plugins;
    list.push(RawValue::from_string(entry.to_owned()).map_err(|e| e.to_string())?);
    Ok(Some(obj.render(Some(&list))))
}

/// The conflist without our entries; `Ok(None)` when there were none.
pub fn remove(conflist: &str) -> Result<Option<String>, String> {
    let obj = Object::parse(conflist)?;
    let Some(raw) = obj.get("plugins") else {
        return Ok(None);
    };
    let plugins: Vec<Box<RawValue>> =
        serde_json::from_str(raw.get()).map_err(|e| format!("`plugins` is not a list: {e}"))?;
    if !plugins.iter().any(|p| is_ours(p)) {
        return Ok(None);
    }
    let kept: Vec<Box<RawValue>> = plugins.into_iter().filter(|p| !is_ours(p)).collect();
    Ok(Some(obj.render(Some(&kept))))
}

/// A single plugin `.conf` wrapped into a conflist (its `cniVersion` and `name` lifted to the
/// top, the plugin kept as it was) with our entry after it.
pub fn wrap(conf: &str, entry: &str) -> Result<String, String> {
    let obj = Object::parse(conf)?;
    let top = |key: &str| obj.get(key).map(|v| v.get().to_owned());
    let version = top("cniVersion").ok_or("the .conf has no cniVersion")?;
    let name = top("name").ok_or("the .conf has no name")?;
    let list = [
        RawValue::from_string(conf.trim().to_owned()).map_err(|e| e.to_string())?,
        RawValue::from_string(entry.to_owned()).map_err(|e| e.to_string())?,
    ];
    let wrapper = Object(vec![
        (
            "cniVersion".into(),
            RawValue::from_string(version).map_err(|e| e.to_string())?,
        ),
        (
            "name".into(),
            RawValue::from_string(name).map_err(|e| e.to_string())?,
        ),
        (
            "plugins".into(),
            RawValue::from_string("[]".into()).map_err(|e| e.to_string())?,
        ),
    ]);
    Ok(wrapper.render(Some(&list)))
}

/// The active network config: the first `.conf`, `.conflist` or `.json` file in name order.
pub fn active_config(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.outrider-{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// What the installer changed in the config directory, to undo it exactly.
#[derive(Debug, Default)]
pub struct Installed {
    /// The file we wrote, its bytes before our edit (`None`: we created it), and what we wrote.
    edits: Vec<(PathBuf, Option<Vec<u8>>, Vec<u8>)>,
    /// A `.conf` we replaced by a `.conflist`, with its bytes.
    wrapped: Option<(PathBuf, Vec<u8>)>,
}

/// Makes sure the active config chains our plugin; returns a line saying what was done, if
/// anything. Called at start and on every poll.
pub fn ensure(
    conf_dir: &Path,
    entry: &str,
    state: &mut Installed,
) -> Result<Option<String>, String> {
    let err = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let Some(path) = active_config(conf_dir).map_err(|e| err(conf_dir, &e))? else {
        return Ok(None); // no network yet: the primary CNI has not written its config
    };
    let bytes = std::fs::read(&path).map_err(|e| err(&path, &e))?;
    let text = String::from_utf8(bytes.clone()).map_err(|e| err(&path, &e))?;
    if path.extension().is_some_and(|e| e == "conflist") {
        let Some(new) = insert(&text, entry).map_err(|e| err(&path, &e))? else {
            return Ok(None);
        };
        write_atomic(&path, new.as_bytes(), 0o644).map_err(|e| err(&path, &e))?;
        state.edits.retain(|(p, _, _)| p != &path);
        state
            .edits
            .push((path.clone(), Some(bytes), new.into_bytes()));
        Ok(Some(format!(
            "inserted {PLUGIN_NAME} into {}",
            path.display()
        )))
    } else {
        let new = wrap(&text, entry).map_err(|e| err(&path, &e))?;
        let target = path.with_extension("conflist");
        write_atomic(&target, new.as_bytes(), 0o644).map_err(|e| err(&target, &e))?;
        std::fs::remove_file(&path).map_err(|e| err(&path, &e))?;
        state.edits.retain(|(p, _, _)| p != &target);
        state.edits.push((target.clone(), None, new.into_bytes()));
        state.wrapped = Some((path.clone(), bytes));
        Ok(Some(format!(
            "wrapped {} into {} with {PLUGIN_NAME}",
            path.display(),
            target.display()
        )))
    }
}

/// Removes exactly what [`ensure`] added: the original bytes back when the file is still ours,
/// else only our entry.
pub fn undo(state: &mut Installed) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, original, written) in state.edits.drain(..) {
        let Ok(now) = std::fs::read(&path) else {
            continue; // gone: nothing of ours is left there
        };
        let result = if now == written {
            match &original {
                Some(bytes) => write_atomic(&path, bytes, 0o644),
                None => std::fs::remove_file(&path),
            }
        } else {
            match String::from_utf8(now)
                .map_err(|e| e.to_string())
                .and_then(|t| remove(&t))
            {
                Ok(Some(clean)) => write_atomic(&path, clean.as_bytes(), 0o644),
                Ok(None) => Ok(()),
                Err(e) => Err(std::io::Error::other(e)),
            }
        };
        if let Err(e) = result {
            problems.push(format!("{}: {e}", path.display()));
        }
    }
    if let Some((path, bytes)) = state.wrapped.take() {
        if let Err(e) = write_atomic(&path, &bytes, 0o644) {
            problems.push(format!("{}: {e}", path.display()));
        }
    }
    problems
}

/// The plugin's kubeconfig: the API server, the ServiceAccount's CA and token.
pub fn kubeconfig(server: &str, ca_pem: &[u8], token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: outrider-cni\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: outrider-cni\n  user:\n    token: {token}\ncontexts:\n- name: outrider-cni\n  context:\n    cluster: local\n    user: outrider-cni\n"
    )
}

/// Installs, keeps the plugin chained until `stop` resolves, then uninstalls.
pub async fn run(
    args: InstallArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let server = match &args.api_server {
        Some(s) => s.clone(),
        None => {
            let host = std::env::var("KUBERNETES_SERVICE_HOST")
                .map_err(|_| "--api-server not given and KUBERNETES_SERVICE_HOST not set")?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            if host.contains(':') {
                format!("https://[{host}]:{port}")
            } else {
                format!("https://{host}:{port}")
            }
        }
    };
    // The ServiceAccount token is rotated by the kubelet: the kubeconfig follows it.
    let render = || -> Result<String, String> {
        let read = |name: &str| {
            let p = args.service_account_dir.join(name);
            std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
        };
        let (ca, token) = (read("ca.crt")?, read("token")?);
        Ok(kubeconfig(
            &server,
            &ca,
            String::from_utf8_lossy(&token).trim(),
        ))
    };
    let kc_name = format!("{PLUGIN_NAME}.kubeconfig");
    let kc_path = args.conf_dir.join(&kc_name);
    let mut kc_text = render()?;
    write_atomic(&kc_path, kc_text.as_bytes(), 0o600)
        .map_err(|e| format!("{}: {e}", kc_path.display()))?;
    let bin = args.bin_dir.join(PLUGIN_NAME);
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let image = std::fs::read(&me).map_err(|e| format!("{}: {e}", me.display()))?;
    write_atomic(&bin, &image, 0o755).map_err(|e| format!("{}: {e}", bin.display()))?;
    eprintln!(
        "outrider cni install: {} and {} written",
        bin.display(),
        kc_path.display()
    );
    let entry = plugin_entry(&args.host_conf_dir.join(&kc_name));
    let mut state = Installed::default();
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_ms.max(10)));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {
                match ensure(&args.conf_dir, &entry, &mut state) {
                    Ok(Some(done)) => eprintln!("outrider cni install: {done}"),
                    Ok(None) => {}
                    Err(e) => eprintln!("outrider cni install: warning: {e}"),
                }
                match render() {
                    Ok(text) if text != kc_text => {
                        match write_atomic(&kc_path, text.as_bytes(), 0o600) {
                            Ok(()) => kc_text = text,
                            Err(e) => eprintln!("outrider cni install: warning: {}: {e}", kc_path.display()),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("outrider cni install: warning: {e}"),
                }
            }
        }
    }
    let mut problems = undo(&mut state);
    for path in [&kc_path, &bin] {
        if let Err(e) = std::fs::remove_file(path) {
            problems.push(format!("{}: {e}", path.display()));
        }
    }
    if problems.is_empty() {
        eprintln!("outrider cni install: uninstalled");
        Ok(())
    } else {
        Err(format!("uninstall incomplete: {}", problems.join("; ")))
    }
}

/// `outrider cni install` until SIGTERM/SIGINT.
pub fn main(args: InstallArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrider cni install: error: {e}");
            return ExitCode::from(1);
        }
    };
    let stop = async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    match rt.block_on(run(args, stop)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrider cni install: error: {e}");
            ExitCode::from(1)
        }
    }
}
