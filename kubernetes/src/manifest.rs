//! Multi-document Kubernetes YAML: read into ordered YAML values (so documents, keys and fields
//! the injector does not own come back as they were), find the workloads and their pod
//! templates, check each workload against the typed `k8s-openapi` structs, and write the
//! documents back.
//!
//! Errors are [`InputError`]s naming the document (1-based, as an editor counts), the item of a
//! `List`, and the field path (`spec.template.spec.containers[0].image`). Comments in the input
//! are not kept: the output is re-serialized YAML.

use std::fmt;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodSpec, ReplicationController, ResourceRequirements};
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use serde_norway::{Mapping, Value};

/// Malformed input: where (document, field path) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    /// Which document, and which item of a `List` (e.g. `document 2, items[1]`).
    pub document: String,
    /// The field path inside it (`spec.template.spec.containers[0].image`), empty for the whole
    /// document.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.document, self.message)
        } else {
            write!(f, "{}: {}: {}", self.document, self.path, self.message)
        }
    }
}

impl std::error::Error for InputError {}

/// Where a document or `List` item sits in the input, for error messages.
#[derive(Debug, Clone)]
pub struct Location(String);

impl Location {
    /// A location named `name` (e.g. `document 1`).
    pub fn new(name: impl Into<String>) -> Location {
        Location(name.into())
    }

    /// The error `message` at `path` of this document.
    pub fn error(&self, path: impl Into<String>, message: impl Into<String>) -> InputError {
        InputError {
            document: self.0.clone(),
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How deep `[`/`{` may nest in the input (the YAML reader's own limit is as deep; checking
/// first keeps a hostile input from costing the reader time quadratic in its depth).
pub const MAX_FLOW_DEPTH: usize = 128;

/// Reads every YAML document of `text`; empty documents (a stray `---`) are dropped.
///
/// What kubectl (a YAML 1.1 reader) accepts is accepted: a UTF-8 byte-order mark, merge keys
/// (`<<: *base`, merged into the mapping), and octal file modes (`defaultMode: 0400`, written
/// back as the number they mean).
pub fn parse(text: &str) -> Result<Vec<Value>, InputError> {
    documents(text)?.map(|d| d.map(|(_, v)| v)).collect()
}

/// [`parse`], one document at a time (with its 0-based index among all documents, empty ones
/// included), so a large stream is never held whole as values.
pub fn documents(
    text: &str,
) -> Result<impl Iterator<Item = Result<(usize, Value), InputError>> + '_, InputError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_flow_depth(text)?;
    let docs = serde_norway::Deserializer::from_str(text).enumerate();
    Ok(docs.filter_map(|(i, doc)| {
        let at = Location(format!("document {}", i + 1));
        let read = || {
            let mut value =
                Value::deserialize(doc).map_err(|e| at.error("", format!("not YAML: {e}")))?;
            value
                .apply_merge()
                .map_err(|e| at.error("", format!("bad merge key (`<<`): {e}")))?;
            octal_modes(&mut value);
            Ok(value)
        };
        match read() {
            Ok(v) if v.is_null() => None,
            Ok(v) => Some(Ok((i, v))),
            Err(e) => Some(Err(e)),
        }
    }))
}

/// Refuses `[`/`{` nested deeper than [`MAX_FLOW_DEPTH`], in one pass over the text (quoted
/// strings and comments skipped).
fn check_flow_depth(text: &str) -> Result<(), InputError> {
    #[derive(PartialEq)]
    enum State {
        Plain,
        Single,
        Double,
        Comment,
    }
    let (mut state, mut depth, mut doc, mut prev) = (State::Plain, 0usize, 1usize, b'\n');
    let mut content = false;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match state {
            State::Plain => match b {
                b'[' | b'{' => {
                    (depth, content) = (depth + 1, true);
                    if depth > MAX_FLOW_DEPTH {
                        return Err(InputError {
                            document: format!("document {doc}"),
                            path: String::new(),
                            message: format!(
                                "not YAML: nested deeper than {MAX_FLOW_DEPTH} levels"
                            ),
                        });
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b'\'' | b'"'
                    if matches!(prev, b' ' | b'\t' | b'\n' | b'[' | b'{' | b',' | b':') =>
                {
                    state = if b == b'"' {
                        State::Double
                    } else {
                        State::Single
                    };
                }
                b'#' if matches!(prev, b' ' | b'\t' | b'\n') => state = State::Comment,
                b'-' if prev == b'\n' && bytes[i..].starts_with(b"---") => {
                    doc += usize::from(content);
                    (depth, content) = (0, false);
                    i += 2;
                }
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ => content = true,
            },
            State::Single if b == b'\'' => state = State::Plain,
            State::Double if b == b'\\' => i += 1,
            State::Double if b == b'"' => state = State::Plain,
            State::Comment if b == b'\n' => state = State::Plain,
            _ => {}
        }
        prev = b;
        i += 1;
    }
    Ok(())
}

/// File modes written the YAML 1.1 way, `defaultMode: 0400` (octal, as kubectl reads them;
/// a YAML 1.2 reader sees the string "0400"), become the numbers they mean.
fn octal_modes(value: &mut Value) {
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Mapping(map) => {
                for (k, v) in map.iter_mut() {
                    let mode = matches!(k.as_str(), Some("defaultMode" | "mode"));
                    match v {
                        Value::String(s) if mode => {
                            if let Some(n) = yaml11_octal(s) {
                                *v = Value::Number(n.into());
                            }
                        }
                        _ => stack.push(v),
                    }
                }
            }
            Value::Sequence(items) => stack.extend(items.iter_mut()),
            Value::Tagged(t) => stack.push(&mut t.value),
            _ => {}
        }
    }
}

/// `0755` → 493: a YAML 1.1 octal integer.
fn yaml11_octal(s: &str) -> Option<u64> {
    let digits = s.strip_prefix('0')?.replace('_', "");
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u64::from_str_radix(&digits, 8).ok()
}

/// Writes documents back as one multi-document YAML stream.
///
/// Strings that a YAML 1.1 reader would take for something else (kubectl reads YAML 1.1:
/// `yes`, `on`, `N` are booleans there, `1_000` a number) are written double-quoted, so a
/// ConfigMap's `"yes"` stays a string on the way through.
pub fn write(docs: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    let mut work = Work::default();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        write_one(doc, &mut out, &mut work)?;
    }
    Ok(out)
}

/// What writing a stream cost, for tests that check it grows in proportion to the input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Documents written.
    pub documents: usize,
    /// Of those, written by `serde_norway` (what [`crate::emit`] does not cover).
    pub by_serde: usize,
    /// The emitter's own counters (nodes and bytes it wrote).
    pub emitted: crate::emit::Work,
    /// The most nodes of one document held at once (documents are streamed).
    pub peak_document_nodes: usize,
}

/// Appends one document: through [`crate::emit`], or `serde_norway` for what it leaves.
fn write_one(doc: &Value, out: &mut String, work: &mut Work) -> Result<(), String> {
    work.documents += 1;
    let before = work.emitted.nodes;
    if crate::emit::document(doc, out, &mut work.emitted).is_some() {
        let nodes = work.emitted.nodes - before;
        work.peak_document_nodes = work.peak_document_nodes.max(nodes);
        return Ok(());
    }
    work.emitted.nodes = before;
    work.by_serde += 1;
    out.push_str(&crate::yaml11::write_with_serde(doc)?);
    Ok(())
}

/// Calls `f` on every object of the stream: each document, and each item of a `List` in place
/// of the `List` itself.
pub fn for_each_object<E>(
    docs: &mut [Value],
    mut f: impl FnMut(&Location, &mut Value) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<InputError>,
{
    for (i, doc) in docs.iter_mut().enumerate() {
        visit(i, doc, &mut f)?;
    }
    Ok(())
}

/// Calls `f` on the object(s) of document `index` (0-based): the document, or each item of a
/// `List`.
pub fn visit<E>(
    index: usize,
    doc: &mut Value,
    f: &mut impl FnMut(&Location, &mut Value) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<InputError>,
{
    let at = Location(format!("document {}", index + 1));
    if is_list(doc) {
        match doc.get_mut("items") {
            Some(Value::Sequence(items)) => {
                for (j, item) in items.iter_mut().enumerate() {
                    f(&Location(format!("{at}, items[{j}]")), item)?;
                }
            }
            Some(Value::Null) | None => {}
            Some(_) => return Err(at.error("items", "must be a list").into()),
        }
    } else {
        f(&at, doc)?;
    }
    Ok(())
}

/// Reads `text` one document at a time, calls `f` on each object, and writes each document
/// back as soon as it is done: the stream as [`write()`] would give it.
pub fn transform(
    text: &str,
    f: impl FnMut(&Location, &mut Value) -> Result<(), InputError>,
) -> Result<String, InputError> {
    transform_counted(text, f).map(|(out, _)| out)
}

/// [`transform`], with what the writing cost.
pub fn transform_counted(
    text: &str,
    mut f: impl FnMut(&Location, &mut Value) -> Result<(), InputError>,
) -> Result<(String, Work), InputError> {
    let mut out = String::with_capacity(text.len() + text.len() / 2);
    let mut work = Work::default();
    for (n, doc) in documents(text)?.enumerate() {
        let (i, mut doc) = doc?;
        visit(i, &mut doc, &mut f)?;
        if n > 0 {
            out.push_str("---\n");
        }
        write_one(&doc, &mut out, &mut work).map_err(|e| InputError {
            document: format!("document {}", i + 1),
            path: String::new(),
            message: e,
        })?;
    }
    Ok((out, work))
}

fn is_list(doc: &Value) -> bool {
    let kind = doc.get("kind").and_then(Value::as_str);
    kind.is_some_and(|k| k == "List" || (k.ends_with("List") && doc.get("items").is_some()))
}

/// The kinds whose pod template the mesh injects into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// A bare Pod: the document is its own template.
    Pod,
    /// apps/v1 Deployment.
    Deployment,
    /// apps/v1 StatefulSet.
    StatefulSet,
    /// apps/v1 DaemonSet.
    DaemonSet,
    /// apps/v1 ReplicaSet.
    ReplicaSet,
    /// core/v1 ReplicationController (the ReplicaSet's predecessor, still served).
    ReplicationController,
    /// batch/v1 Job.
    Job,
    /// batch/v1 CronJob (the template under `spec.jobTemplate.spec.template`).
    CronJob,
}

impl WorkloadKind {
    /// The kind of `object`, if it is a workload.
    pub fn of(object: &Value) -> Option<WorkloadKind> {
        Some(match object.get("kind")?.as_str()? {
            "Pod" => WorkloadKind::Pod,
            "Deployment" => WorkloadKind::Deployment,
            "StatefulSet" => WorkloadKind::StatefulSet,
            "DaemonSet" => WorkloadKind::DaemonSet,
            "ReplicaSet" => WorkloadKind::ReplicaSet,
            "ReplicationController" => WorkloadKind::ReplicationController,
            "Job" => WorkloadKind::Job,
            "CronJob" => WorkloadKind::CronJob,
            _ => return None,
        })
    }

    /// Path of the pod template (an object with `metadata` and `spec`) inside the object.
    pub fn template_path(self) -> &'static [&'static str] {
        match self {
            WorkloadKind::Pod => &[],
            WorkloadKind::CronJob => &["spec", "jobTemplate", "spec", "template"],
            _ => &["spec", "template"],
        }
    }

    /// Whether pods of this kind are expected to finish (a legacy sidecar keeps them running).
    pub fn runs_to_completion(self) -> bool {
        matches!(self, WorkloadKind::Job | WorkloadKind::CronJob)
    }
}

/// A workload checked against its typed struct: its kind, name, namespace and pod spec.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The kind.
    pub kind: WorkloadKind,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`, if given.
    pub namespace: Option<String>,
    /// The pod template's spec, typed.
    pub pod: PodSpec,
    /// Pod-level `spec.resources` (Kubernetes 1.32+; not in the 1.30 types of `pod`).
    pub pod_resources: Option<ResourceRequirements>,
}

impl Workload {
    /// Checks `object` (a workload of `kind`) against the Kubernetes 1.30 types and returns it,
    /// or the field path that does not fit.
    pub fn check(
        kind: WorkloadKind,
        object: &Value,
        at: &Location,
    ) -> Result<Workload, InputError> {
        let pod = match kind {
            WorkloadKind::Pod => typed::<Pod>(object, at)?.spec,
            WorkloadKind::Deployment => typed::<Deployment>(object, at)?
                .spec
                .and_then(|s| s.template.spec),
            WorkloadKind::StatefulSet => typed::<StatefulSet>(object, at)?
                .spec
                .and_then(|s| s.template.spec),
            WorkloadKind::DaemonSet => typed::<DaemonSet>(object, at)?
                .spec
                .and_then(|s| s.template.spec),
            WorkloadKind::ReplicaSet => typed::<ReplicaSet>(object, at)?
                .spec
                .and_then(|s| s.template?.spec),
            WorkloadKind::ReplicationController => typed::<ReplicationController>(object, at)?
                .spec
                .and_then(|s| s.template?.spec),
            WorkloadKind::Job => typed::<Job>(object, at)?.spec.and_then(|s| s.template.spec),
            WorkloadKind::CronJob => typed::<CronJob>(object, at)?
                .spec
                .and_then(|s| s.job_template.spec?.template.spec),
        };
        let spec_path = format!("{}spec", prefix(kind));
        let pod = pod.ok_or_else(|| at.error(spec_path, "missing: a workload needs a pod spec"))?;
        let meta = object.get("metadata");
        let field = |key: &str| {
            meta.and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
        };
        // `generateName: job-` (the API server appends a suffix): the prefix names the workload.
        let name = field("name")
            .or_else(|| field("generateName").map(|g| g.trim_end_matches(['-', '.'])))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                at.error(
                    "metadata.name",
                    "missing: the workload needs a name (or a generateName)",
                )
            })?
            .to_owned();
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut template = object;
        for key in kind.template_path() {
            template = template.get(*key).unwrap_or(&Value::Null);
        }
        let pod_resources = match template.get("spec").and_then(|s| s.get("resources")) {
            None | Some(Value::Null) => None,
            Some(r) => Some(typed::<ResourceRequirements>(r, at).map_err(|e| {
                let path = format!("{}spec.resources.{}", prefix(kind), e.path);
                at.error(path.trim_end_matches('.'), e.message)
            })?),
        };
        Ok(Workload {
            kind,
            name,
            namespace,
            pod,
            pod_resources,
        })
    }
}

/// The field-path prefix of the pod template (`spec.template.`), empty for a Pod.
pub fn prefix(kind: WorkloadKind) -> String {
    kind.template_path()
        .iter()
        .map(|p| format!("{p}."))
        .collect()
}

/// `object` as the typed `T`, or the field path that does not fit.
pub fn typed<T: DeserializeOwned>(object: &Value, at: &Location) -> Result<T, InputError> {
    serde_path_to_error::deserialize(quantities_as_strings(object.clone())).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        at.error(path, e.into_inner().to_string())
    })
}

/// Quantities written as bare numbers (`cpu: 0.5`, `memory: 1e3`), which kubectl and the API
/// server accept, as the strings `k8s-openapi`'s `Quantity` reads: every number in a
/// `requests`, `limits` or `overhead` mapping, and `sizeLimit`.
fn quantities_as_strings(mut value: Value) -> Value {
    fn string(v: &mut Value) {
        if let Value::Number(n) = v {
            *v = Value::String(n.to_string());
        }
    }
    let mut stack = vec![&mut value];
    while let Some(v) = stack.pop() {
        match v {
            Value::Mapping(map) => {
                for (k, v) in map.iter_mut() {
                    match (k.as_str(), v) {
                        (Some("requests" | "limits" | "overhead"), Value::Mapping(m)) => {
                            m.values_mut().for_each(string);
                        }
                        (Some("sizeLimit"), v) => string(v),
                        (_, v) => stack.push(v),
                    }
                }
            }
            Value::Sequence(items) => stack.extend(items.iter_mut()),
            Value::Tagged(t) => stack.push(&mut t.value),
            _ => {}
        }
    }
    value
}

/// The pod template (`metadata` + `spec`) of a workload object, mutable.
pub fn template_mut(object: &mut Value, kind: WorkloadKind) -> Option<&mut Mapping> {
    let mut v = object;
    for key in kind.template_path() {
        v = v.get_mut(*key)?;
    }
    v.as_mapping_mut()
}

/// `map[key]` as a mapping, created (appended) when absent.
pub fn child_map<'a>(map: &'a mut Mapping, key: &str) -> Option<&'a mut Mapping> {
    if !map.contains_key(key) || map.get(key).is_some_and(Value::is_null) {
        map.insert(key.into(), Value::Mapping(Mapping::new()));
    }
    map.get_mut(key)?.as_mapping_mut()
}

/// `map[key]` as a sequence, created (appended) when absent.
pub fn child_seq<'a>(map: &'a mut Mapping, key: &str) -> Option<&'a mut Vec<Value>> {
    if !map.contains_key(key) || map.get(key).is_some_and(Value::is_null) {
        map.insert(key.into(), Value::Sequence(Vec::new()));
    }
    map.get_mut(key)?.as_sequence_mut()
}

/// Removes `map[key]` when it is an empty mapping or sequence.
pub fn drop_if_empty(map: &mut Mapping, key: &str) {
    let empty = match map.get(key) {
        Some(Value::Mapping(m)) => m.is_empty(),
        Some(Value::Sequence(s)) => s.is_empty(),
        _ => false,
    };
    if empty {
        map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::yaml11::{is_yaml11_timestamp, unmark};

    #[test]
    fn lists_and_documents_are_visited_in_order() {
        let mut docs =
            parse("kind: A\n---\n---\nkind: List\napiVersion: v1\nitems:\n- kind: B\n- kind: C\n")
                .unwrap();
        let mut seen = Vec::new();
        for_each_object::<InputError>(&mut docs, |at, v| {
            seen.push(format!("{at}: {}", v["kind"].as_str().unwrap()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                "document 1: A",
                "document 2, items[0]: B",
                "document 2, items[1]: C"
            ]
        );
    }

    #[test]
    fn typed_check_names_the_field_path() {
        let doc = parse(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {}\n  template:\n    spec:\n      containers:\n      - name: app\n        ports: [{containerPort: http}]\n",
        )
        .unwrap();
        let at = Location("document 1".into());
        let e = Workload::check(WorkloadKind::Deployment, &doc[0], &at).unwrap_err();
        assert_eq!(
            e.path,
            "spec.template.spec.containers[0].ports[0].containerPort"
        );
        assert!(
            e.to_string().starts_with("document 1: spec.template"),
            "{e}"
        );
    }

    #[test]
    fn strings_yaml_1_1_reads_otherwise_are_quoted_and_survive() {
        let values = [
            "yes", "on", "Off", "N", "1_000", "0b1_0", "1_0.5", "12:30:00", "1:30.5", "2026-10",
            "1.4.2", "a\\0", "x\\", "no way", "10:3", "a:b",
        ];
        let mut doc = Mapping::new();
        for v in values {
            doc.insert(v.into(), v.into());
        }
        let text = write(&[Value::Mapping(doc.clone())]).unwrap();
        for v in [
            "yes", "on", "Off", "N", "1_000", "0b1_0", "1_0.5", "12:30:00", "1:30.5",
        ] {
            assert!(text.contains(&format!("\"{v}\": \"{v}\"\n")), "{v}: {text}");
        }
        for v in ["2026-10", "1.4.2", "no way", "a:b"] {
            assert!(text.contains(&format!("{v}: {v}\n")), "{v}: {text}");
        }
        assert_eq!(parse(&text).unwrap(), [Value::Mapping(doc)], "{text}");
        assert_eq!(write(&parse(&text).unwrap()).unwrap(), text);
        assert_eq!(unmark(r#""a\\0""#), r#""a\\0""#);
        assert_eq!(unmark(r#""a\0" "b\\\0""#), r#""a" "b\\""#);
    }

    #[test]
    fn what_kubectl_reads_is_read_alike() {
        // BOM, octal modes (plain: YAML 1.1 octal), merge keys.
        let text = "\u{feff}apiVersion: v1\nkind: Pod\nmetadata: {generateName: job-}\nspec:\n  volumes:\n  - {name: s, secret: {secretName: s, defaultMode: 0400, items: [{key: k, path: k, mode: 0755}]}}\n  - {name: c, configMap: {name: c, defaultMode: 420}}\n  containers:\n  - &base {name: a, image: x, resources: {limits: {cpu: 0.5, memory: 1e3}, requests: {memory: 129e6}}}\n  - <<: *base\n    name: b\n";
        let docs = parse(text).unwrap();
        let spec = &docs[0]["spec"];
        assert_eq!(
            spec["volumes"][0]["secret"]["defaultMode"],
            Value::from(256)
        );
        assert_eq!(
            spec["volumes"][0]["secret"]["items"][0]["mode"],
            Value::from(493)
        );
        assert_eq!(
            spec["volumes"][1]["configMap"]["defaultMode"],
            Value::from(420)
        );
        assert_eq!(spec["containers"][1]["name"], Value::from("b"));
        assert_eq!(spec["containers"][1]["image"], Value::from("x"));
        assert!(spec["containers"][1].get("<<").is_none());
        let at = Location::new("document 1");
        let w = Workload::check(WorkloadKind::Pod, &docs[0], &at).unwrap();
        assert_eq!(w.name, "job");
        let limits = w.pod.containers[1]
            .resources
            .clone()
            .unwrap()
            .limits
            .unwrap();
        let cpu: crate::quantity::Quantity = limits["cpu"].0.parse().unwrap();
        assert_eq!(cpu.cpu(), "500m");
        let memory: crate::quantity::Quantity = limits["memory"].0.parse().unwrap();
        assert_eq!(memory.memory(), "1000");
        // Written back: numbers stay numbers (kubectl reads them), the mode as its value.
        let out = write(&docs).unwrap();
        assert!(out.contains("defaultMode: 256\n"), "{out}");
        assert!(out.contains("cpu: 0.5\n"), "{out}");
        // A quoted "0400" elsewhere stays a quoted string.
        let cm = parse("kind: ConfigMap\ndata: {a: \"0400\", b: \"08\"}\n").unwrap();
        let out = write(&cm).unwrap();
        assert!(
            out.contains("a: \"0400\"\n") && out.contains("b: \"08\"\n"),
            "{out}"
        );
        // A ReplicationController is a workload.
        let rc = parse("apiVersion: v1\nkind: ReplicationController\nmetadata: {name: r}\nspec:\n  template:\n    spec: {containers: [{name: a, image: x}]}\n").unwrap();
        let kind = WorkloadKind::of(&rc[0]).unwrap();
        assert_eq!(kind, WorkloadKind::ReplicationController);
        assert_eq!(
            Workload::check(kind, &rc[0], &at).unwrap().pod.containers[0].name,
            "a"
        );
        // Neither name nor generateName.
        let e = Workload::check(WorkloadKind::Pod, &parse("apiVersion: v1\nkind: Pod\nmetadata: {generateName: \"-\"}\nspec: {containers: []}\n").unwrap()[0], &at).unwrap_err();
        assert_eq!(e.path, "metadata.name");
    }

    #[test]
    fn timestamps_yaml_1_1_reads_stay_quoted() {
        for t in [
            "2001-12-14",
            "2001-12-14T21:59:43Z",
            "2001-12-14t21:59:43.10-05:00",
            "2001-12-14 21:59:43.10 -5",
            "2001-1-4 1:59:43",
            "2001-12-14T21:59:43",
        ] {
            assert!(is_yaml11_timestamp(t), "{t}");
            let text = write(&[Value::from(t)]).unwrap();
            assert_eq!(text, format!("\"{t}\"\n"));
        }
        for t in [
            "2001-1-4",
            "2001-12-14T",
            "2001-12-14x",
            "20011-12-14",
            "2001-12-14T21:59",
            "2001-12-14T21:59:43Q",
            "v2001-12-14",
        ] {
            assert!(!is_yaml11_timestamp(t), "{t}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_the_reader_sees_it() {
        let deep = format!(
            "a: 1\n---\nx: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let e = parse(&deep).unwrap_err();
        assert_eq!(e.document, "document 2", "{e}");
        assert!(e.message.contains("nested deeper than 128"), "{e}");
        // Brackets in quotes and comments do not count; 128 levels are fine.
        let ok = format!(
            "a: '{}'\nb: \"{}\" # {}\nc: {}{}\n",
            "[".repeat(200),
            "{".repeat(200),
            "[".repeat(200),
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn bad_yaml_names_the_document() {
        let e = parse("a: 1\n---\na: [\n").unwrap_err();
        assert_eq!(e.document, "document 2");
    }
}
