//! A reload (SIGHUP): the new config's plan laid over the running one.
//!
//! Only `sources` and `sinks` may change; any other key that differs
//! refuses the reload, naming it. A source or sink whose table is the same
//! (for a sink, apart from its `inputs`) is *kept*: it keeps its id, its
//! sockets, connections, queues, sender and disk buffer. One that is gone is
//! *removed*: its entry stays in the plan under its id, marked `removed`,
//! so that what its tasks still hold stays meaningful while they end. One
//! that is new, or whose table changed, is *added* under a new id (a
//! changed one is removed and added). Ids are never reused while the process
//! runs, so the plan only grows, up to [`SOURCE_SLOTS_MAX`] and
//! [`SINK_SLOTS_MAX`] ids; past them a reload is refused and a restart asked
//! for.

use super::{Plan, SinkPlan, SourcePlan, SINK_SLOTS_MAX, SOURCE_SLOTS_MAX};

/// What a reload changes, and the plan to run after it.
#[derive(Debug)]
pub struct Reload {
    pub plan: Plan,
    /// Ids (in `plan`) of the sources and sinks to start.
    pub added_sources: Vec<usize>,
    pub added_sinks: Vec<usize>,
    /// Ids of the sources and sinks to end (marked `removed` in `plan`).
    pub removed_sources: Vec<usize>,
    pub removed_sinks: Vec<usize>,
}

impl Reload {
    /// Whether it changes nothing that runs (routing may still change).
    pub fn is_empty(&self) -> bool {
        self.added_sources.is_empty()
            && self.added_sinks.is_empty()
            && self.removed_sources.is_empty()
            && self.removed_sinks.is_empty()
    }

    /// Names of the sources added, changed and removed (in that order).
    pub fn sources(&self) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
        let name = |&i: &usize| self.plan.sources[i].name.as_str();
        split(
            self.added_sources.iter().map(name).collect(),
            self.removed_sources.iter().map(name).collect(),
        )
    }

    /// Names of the sinks added, changed and removed (in that order).
    pub fn sinks(&self) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
        let name = |&i: &usize| self.plan.sinks[i].name.as_str();
        split(
            self.added_sinks.iter().map(name).collect(),
            self.removed_sinks.iter().map(name).collect(),
        )
    }
}

/// (added, changed, removed) from the names added and removed: a name in
/// both was changed.
fn split<'a>(
    added: Vec<&'a str>,
    removed: Vec<&'a str>,
) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>) {
    let changed: Vec<&str> = added
        .iter()
        .copied()
        .filter(|a| removed.contains(a))
        .collect();
    (
        added.into_iter().filter(|a| !changed.contains(a)).collect(),
        changed.clone(),
        removed
            .into_iter()
            .filter(|r| !changed.contains(r))
            .collect(),
    )
}

/// `name`'s table in section `section` (`sources`, `sinks`) of a config.
fn entry(config: &toml::Table, section: &str, name: &str) -> Option<toml::Value> {
    config.get(section)?.as_table()?.get(name).cloned()
}

/// A sink's table without its `inputs`: what its sender and buffer depend on.
fn sink_body(config: &toml::Table, name: &str) -> Option<toml::Value> {
    let mut v = entry(config, "sinks", name)?;
    if let Some(t) = v.as_table_mut() {
        t.remove("inputs");
    }
    Some(v)
}

/// Lays `new` (parsed from `new_config`) over the running `old` (parsed,
/// with every reload before, from `old_config`).
pub fn merge(
    old: &Plan,
    old_config: &toml::Table,
    new: Plan,
    new_config: &toml::Table,
) -> Result<Reload, String> {
    let mut keys: Vec<&String> = old_config
        .keys()
        .chain(new_config.keys())
        .filter(|k| *k != "sources" && *k != "sinks")
        .collect();
    keys.sort();
    keys.dedup();
    if let Some(k) = keys
        .iter()
        .find(|k| old_config.get(**k) != new_config.get(**k))
    {
        return Err(format!(
            "{k} changed: a reload changes only sources and sinks; restart updraft to apply it"
        ));
    }

    // New id → id in the merged plan.
    let (src_ids, added_sources, removed_sources) = ids(
        old.sources.iter().map(|s| (s.name.as_str(), s.removed)),
        new.sources.iter().map(|s| s.name.as_str()),
        |name| entry(old_config, "sources", name) == entry(new_config, "sources", name),
    );
    let (sink_ids, added_sinks, removed_sinks) = ids(
        old.sinks.iter().map(|s| (s.name.as_str(), s.removed)),
        new.sinks.iter().map(|s| s.name.as_str()),
        |name| sink_body(old_config, name) == sink_body(new_config, name),
    );
    let n_sources = old.sources.len() + added_sources.len();
    let n_sinks = old.sinks.len() + added_sinks.len();
    let restart = "restart updraft to apply this config (ids are given anew at a start)";
    if n_sources > SOURCE_SLOTS_MAX {
        return Err(format!(
            "sources: this reload would need {n_sources} source ids, more than the {SOURCE_SLOTS_MAX} a running collector has (a removed or changed source keeps its id until a restart); {restart}"
        ));
    }
    if n_sinks > SINK_SLOTS_MAX {
        return Err(format!(
            "sinks: this reload would need {n_sinks} sink ids, more than the {SINK_SLOTS_MAX} a running collector has (a removed or changed sink keeps its id until a restart); {restart}"
        ));
    }

    let mut sinks: Vec<Option<SinkPlan>> = old.sinks.iter().cloned().map(Some).collect();
    sinks.resize(n_sinks, None);
    for &i in &removed_sinks {
        if let Some(s) = sinks[i].as_mut() {
            s.removed = true;
        }
    }
    for (j, mut s) in new.sinks.into_iter().enumerate() {
        let id = sink_ids[j];
        s.inputs = s.inputs.iter().map(|&k| src_ids[k]).collect();
        let kept = sinks.get(id).and_then(Option::as_ref);
        // A removed source that still drains keeps the mark it had (its rank
        // among the sources the sink took); ids the sink never took, the
        // lowest.
        let mut marks = kept.map_or_else(Vec::new, |k| k.marks.clone());
        marks.resize(n_sources, 1);
        for (k, m) in s.marks.iter().enumerate() {
            marks[src_ids[k]] = *m;
        }
        s.marks = marks;
        if let Some(kept) = kept {
            // The byte budget its shards share goes on.
            s.rate = kept.rate.clone();
        }
        sinks[id] = Some(s);
    }
    let sinks: Vec<SinkPlan> = sinks
        .into_iter()
        .map(|s| s.expect("every id filled"))
        .collect();
    let live_sink = |s: usize| !sinks[s].removed;

    let mut sources: Vec<Option<SourcePlan>> = old.sources.iter().cloned().map(Some).collect();
    sources.resize(n_sources, None);
    for (j, mut s) in new.sources.into_iter().enumerate() {
        s.sinks = s.sinks.iter().map(|&k| sink_ids[k]).collect();
        for f in &mut s.filters {
            f.sink = sink_ids[f.sink];
        }
        sources[src_ids[j]] = Some(s);
    }
    let mut sources: Vec<SourcePlan> = sources
        .into_iter()
        .map(|s| s.expect("every id filled"))
        .collect();
    for &i in &removed_sources {
        sources[i].removed = true;
    }
    for s in sources.iter_mut().filter(|s| s.removed) {
        // What a removed source still reads goes only to sinks that run.
        s.sinks.retain(|&k| live_sink(k));
        s.filters.retain(|f| live_sink(f.sink));
    }

    Ok(Reload {
        plan: Plan {
            sources,
            sinks,
            ..new
        },
        added_sources,
        added_sinks,
        removed_sources,
        removed_sinks,
    })
}

/// For one section: each new entry's id in the merged plan, the ids added
/// (new or changed names, after the old ids) and the old ids removed
/// (gone or changed). `same(name)` tells whether a name's table is unchanged.
fn ids<'a>(
    old: impl Iterator<Item = (&'a str, bool)>,
    new: impl Iterator<Item = &'a str>,
    same: impl Fn(&str) -> bool,
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let new: Vec<&str> = new.collect();
    let mut map = vec![usize::MAX; new.len()];
    let mut removed = Vec::new();
    let mut n_old = 0;
    for (i, (name, was_removed)) in old.enumerate() {
        n_old = i + 1;
        if was_removed {
            continue;
        }
        match new.iter().position(|n| *n == name) {
            Some(j) if same(name) => map[j] = i,
            _ => removed.push(i),
        }
    }
    let mut added = Vec::new();
    for m in map.iter_mut().filter(|m| **m == usize::MAX) {
        *m = n_old + added.len();
        added.push(*m);
    }
    (map, added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> (Plan, toml::Table) {
        (Plan::from_toml(text).unwrap(), text.parse().unwrap())
    }

    const BASE: &str = r#"
shards = 2
[sources.a]
type = "tcp"
address = "127.0.0.1:40001"
[sources.b]
type = "udp"
address = "127.0.0.1:40002"
[sinks.out]
type = "blackhole"
inputs = ["a", "b"]
"#;

    #[test]
    fn kept_entries_keep_their_ids_and_new_ones_come_after() {
        let (old, old_t) = plan(BASE);
        let next = r#"
shards = 2
[sources.a]
type = "tcp"
address = "127.0.0.1:40001"
[sinks.out]
type = "blackhole"
inputs = ["a"]
[sinks.more]
type = "blackhole"
inputs = ["a"]
"#;
        let (new, new_t) = plan(next);
        let r = merge(&old, &old_t, new, &new_t).unwrap();
        // a (0) kept, b (1) removed; out (0) kept despite new inputs; more added.
        assert_eq!(r.removed_sources, vec![1]);
        assert!(r.added_sources.is_empty());
        assert_eq!(r.added_sinks, vec![1]);
        assert!(r.removed_sinks.is_empty());
        // What b still reads goes to the sink that runs.
        assert!(r.plan.sources[1].removed);
        assert_eq!(r.plan.sources[1].sinks, vec![0]);
        let mut to = r.plan.sources[0].sinks.clone();
        to.sort_unstable();
        assert_eq!(to, vec![0, 1]);
        assert_eq!(r.plan.sinks[0].inputs, vec![0]);
        assert_eq!(r.plan.sinks[1].inputs, vec![0]);
        assert_eq!(r.plan.sinks[1].marks.len(), 2);
        assert_eq!(r.sinks(), (vec!["more"], vec![], vec![]));
        assert_eq!(r.sources(), (vec![], vec![], vec!["b"]));
    }

    #[test]
    fn a_changed_source_is_removed_and_added_under_a_new_id() {
        let (old, old_t) = plan(BASE);
        let next = BASE.replace("type = \"udp\"", "type = \"tcp\"");
        let (new, new_t) = plan(&next);
        let r = merge(&old, &old_t, new, &new_t).unwrap();
        assert_eq!(r.removed_sources, vec![1]);
        assert_eq!(r.added_sources, vec![2]);
        assert_eq!(r.plan.sources[2].name, "b");
        assert_eq!(r.plan.sinks[0].inputs, vec![0, 2]);
        assert_eq!(r.sources(), (vec![], vec!["b"], vec![]));
        // And again: the removed id stays removed, the new one is kept.
        let (new2, new2_t) = plan(&next);
        let r2 = merge(&r.plan, &new_t, new2, &new2_t).unwrap();
        assert!(r2.is_empty());
        assert_eq!(r2.plan.sources.len(), 3);
        assert!(r2.plan.sources[1].removed);
    }

    #[test]
    fn a_changed_global_key_is_refused_by_name() {
        let (old, old_t) = plan(BASE);
        let (new, new_t) = plan(&BASE.replace("shards = 2", "shards = 1"));
        let e = merge(&old, &old_t, new, &new_t).unwrap_err();
        assert!(e.starts_with("shards changed"), "{e}");
    }
}
