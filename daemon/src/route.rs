//! Routing: which sinks an event goes to. Rules match on source, event type (exact or glob) and an optional
//! CEL predicate (`when`) over `event`, `source`, `headers` and the parsed `body`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::types::RouteConfig;

/// Variables a `when` predicate may use.
pub const PREDICATE_VARIABLES: [&str; 4] = ["event", "source", "headers", "body"];

/// One compiled `[[routes]]` entry.
struct CompiledRoute {
    name: String,
    /// `None`: every source.
    sources: Option<HashSet<String>>,
    events: GlobSet,
    when: Option<cel::Program>,
    to: Vec<String>,
}

impl std::fmt::Debug for CompiledRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRoute").field("name", &self.name).field("to", &self.to).finish_non_exhaustive()
    }
}

/// A problem with one route's config: which field, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    /// Index in `[[routes]]`.
    pub index: usize,
    /// Field name (`events`, `when`, ...), with an array index where it applies (`events[1]`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// The variables only predicates need: headers (lower-case names, credentials removed) and the parsed body.
pub type Details = (BTreeMap<String, String>, serde_json::Value);

/// What a route looks at.
pub struct RouteInput<'a> {
    /// Source id.
    pub source: &'a str,
    /// Event type.
    pub event: &'a str,
    /// Builds `headers` and `body` for predicates; called at most once, and only when a predicate of a
    /// route that matches source and event needs them (so most events are never parsed twice).
    pub details: &'a dyn Fn() -> Details,
}

impl std::fmt::Debug for RouteInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteInput").field("source", &self.source).field("event", &self.event).finish_non_exhaustive()
    }
}

/// The result of routing one event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDecision {
    /// Distinct sink ids, in the order routes name them.
    pub sinks: Vec<String>,
    /// Routes whose predicate failed to evaluate (e.g. a missing field without `has()`): treated as no match.
    pub predicate_errors: Vec<(String, String)>,
}

/// CEL's standard environment, built once: it registers every standard function and type, which costs more
/// than compiling a typical predicate (config checks and reloads compile every route again).
static CEL_ENV: std::sync::LazyLock<Arc<cel::Env>> = std::sync::LazyLock::new(|| Arc::new(cel::Env::stdlib()));

/// All routes, compiled once per config load.
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
    env: Arc<cel::Env>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable").field("routes", &self.routes).finish_non_exhaustive()
    }
}

impl RouteTable {
    /// Compiles globs and predicates; reports every problem.
    pub fn compile(routes: &[RouteConfig]) -> Result<RouteTable, Vec<RouteError>> {
        let env = Arc::clone(&CEL_ENV);
        let mut errors = Vec::new();
        let mut compiled = Vec::new();
        for (index, r) in routes.iter().enumerate() {
            let mut err = |field: String, message: String| errors.push(RouteError { index, field, message });
            let mut builder = GlobSetBuilder::new();
            let patterns: Vec<String> = if r.events.is_empty() { vec!["*".into()] } else { r.events.clone() };
            for (i, p) in patterns.iter().enumerate() {
                if p.is_empty() {
                    err(format!("events[{i}]"), "empty event pattern".into());
                    continue;
                }
                match Glob::new(p) {
                    Ok(g) => {
                        builder.add(g);
                    }
                    Err(e) => err(format!("events[{i}]"), format!("invalid glob {p:?}: {}", e.kind())),
                }
            }
            let events = match builder.build() {
                Ok(set) => set,
                Err(e) => {
                    err("events".into(), e.to_string());
                    GlobSet::empty()
                }
            };
            let when = match &r.when {
                None => None,
                Some(src) => match env.compile(src) {
                    Ok(program) => {
                        let refs = program.references();
                        let unknown: Vec<&str> =
                            refs.variables().into_iter().filter(|v| !PREDICATE_VARIABLES.contains(v)).collect();
                        if unknown.is_empty() {
                            Some(program)
                        } else {
                            err(
                                "when".into(),
                                format!(
                                    "unknown variable(s) {} (a predicate sees: {})",
                                    unknown.join(", "),
                                    PREDICATE_VARIABLES.join(", ")
                                ),
                            );
                            None
                        }
                    }
                    Err(e) => {
                        err("when".into(), format!("invalid CEL expression: {}", e.to_string().replace('\n', "; ")));
                        None
                    }
                },
            };
            if r.to.is_empty() {
                err("to".into(), "a route must name at least one destination".into());
            }
            let sources = if r.sources.is_empty() { None } else { Some(r.sources.iter().cloned().collect()) };
            compiled.push(CompiledRoute { name: r.name.clone(), sources, events, when, to: r.to.clone() });
        }
        if errors.is_empty() { Ok(RouteTable { routes: compiled, env }) } else { Err(errors) }
    }

    /// True when no route has a predicate (then routing never needs the CEL context).
    fn needs_context(&self, input: &RouteInput<'_>) -> bool {
        self.routes.iter().any(|r| r.when.is_some() && Self::prefilter(r, input))
    }

    fn prefilter(r: &CompiledRoute, input: &RouteInput<'_>) -> bool {
        r.sources.as_ref().is_none_or(|s| s.contains(input.source)) && r.events.is_match(input.event)
    }

    /// The sinks `input` goes to.
    pub fn route(&self, input: &RouteInput<'_>) -> RouteDecision {
        let mut decision = RouteDecision::default();
        let context = if self.needs_context(input) { Some(self.context(input)) } else { None };
        for r in &self.routes {
            if !Self::prefilter(r, input) {
                continue;
            }
            if let (Some(program), Some(ctx)) = (&r.when, &context) {
                match ctx.as_ref().map(|c| program.execute(c)) {
                    Ok(Ok(cel::Value::Bool(true))) => {}
                    Ok(Ok(cel::Value::Bool(false))) => continue,
                    Ok(Ok(other)) => {
                        decision
                            .predicate_errors
                            .push((r.name.clone(), format!("predicate gave {other:?}, not a bool")));
                        continue;
                    }
                    Ok(Err(e)) => {
                        decision.predicate_errors.push((r.name.clone(), e.to_string()));
                        continue;
                    }
                    Err(e) => {
                        decision.predicate_errors.push((r.name.clone(), e.clone()));
                        continue;
                    }
                }
            }
            for sink in &r.to {
                if !decision.sinks.contains(sink) {
                    decision.sinks.push(sink.clone());
                }
            }
        }
        decision
    }

    fn context(&self, input: &RouteInput<'_>) -> Result<cel::Context<'static, 'static>, String> {
        let mut ctx = cel::Context::with_env(Arc::clone(&self.env));
        ctx.add_variable("event", input.event).map_err(|e| e.to_string())?;
        ctx.add_variable("source", input.source).map_err(|e| e.to_string())?;
        let (headers, body) = (input.details)();
        ctx.add_variable("headers", &headers).map_err(|e| e.to_string())?;
        ctx.add_variable("body", &body).map_err(|e| e.to_string())?;
        Ok(ctx)
    }

    /// Names of the routes, in config order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(name: &str, sources: &[&str], events: &[&str], when: Option<&str>, to: &[&str]) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            events: events.iter().map(|s| s.to_string()).collect(),
            when: when.map(str::to_owned),
            to: to.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn decide(table: &RouteTable, source: &str, event: &str, body: serde_json::Value) -> Vec<String> {
        let details = || {
            let headers = BTreeMap::from([("user-agent".to_owned(), "Vert.x-WebClient/4.2.5".to_owned())]);
            (headers, body.clone())
        };
        table.route(&RouteInput { source, event, details: &details }).sinks
    }

    #[test]
    fn globs_predicates_and_fan_out() {
        let table = RouteTable::compile(&[
            route("entries", &["clockify"], &["TIME_ENTRY_*", "NEW_TIME_ENTRY"], None, &["a"]),
            route("billable", &[], &["*"], Some("has(body.billable) && body.billable == true"), &["b", "a"]),
            route("clockodo", &["clockodo"], &["entry.*"], None, &["c"]),
            route("ua", &[], &["*"], Some("headers['user-agent'].startsWith('Vert.x')"), &["d"]),
        ])
        .unwrap();
        assert_eq!(decide(&table, "clockify", "NEW_TIME_ENTRY", json!({})), ["a", "d"]);
        assert_eq!(decide(&table, "clockify", "TIME_ENTRY_UPDATED", json!({"billable": true})), ["a", "b", "d"]);
        assert_eq!(decide(&table, "other", "TIME_ENTRY_UPDATED", json!({"billable": false})), ["d"]);
        assert_eq!(decide(&table, "clockodo", "entry.created", json!({})), ["c", "d"]);
        assert_eq!(decide(&table, "clockodo", "user.created", json!({})), ["d"]);
    }

    #[test]
    fn predicate_errors_do_not_match() {
        let table = RouteTable::compile(&[route("r", &[], &[], Some("body.missing.deep == 1"), &["a"])]).unwrap();
        let details = || (BTreeMap::new(), json!({}));
        let d = table.route(&RouteInput { source: "s", event: "E", details: &details });
        assert!(d.sinks.is_empty());
        assert_eq!(d.predicate_errors.len(), 1);
    }

    #[test]
    fn reports_every_bad_field() {
        let errors = RouteTable::compile(&[
            route("r", &[], &["[bad"], Some("body.x =="), &[]),
            route("s", &[], &[], Some("bodyy.x == 1"), &["a"]),
        ])
        .unwrap_err();
        let fields: Vec<(usize, &str)> = errors.iter().map(|e| (e.index, e.field.as_str())).collect();
        assert_eq!(fields, [(0, "events[0]"), (0, "when"), (0, "to"), (1, "when")]);
    }
}
