//! `file` sink: appends one JSON line per event (`id`, `source`, `type`, `time`, `headers`, `body`), written
//! by one thread that fsyncs once per batch of waiting lines. A delivery counts once its line is on disk.
//!
//! Every line in the file always parses: a write that a crash (`kill -9`, power loss) or a full disk cut
//! short leaves a torn last line, which is cut off at open; a write that fails while running is rolled back
//! to the length before it. The lines cut were never acknowledged, so they are written again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use super::{BoxFuture, Sink, SinkError};
use crate::config::FileSinkSpec;
use crate::event::Event;
use crate::limits::{FILE_BATCH_MAX, FILE_BATCH_WINDOW};

type Job = (Vec<u8>, oneshot::Sender<Result<(), String>>);

/// Appends JSON lines.
#[derive(Debug)]
pub struct FileSink {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

impl FileSink {
    /// Opens (creating) the file for appending and starts its writer thread.
    pub fn open(spec: &FileSinkSpec) -> Result<Self, String> {
        if let Some(parent) = spec.path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&spec.path)
            .map_err(|e| format!("cannot open {}: {e}", spec.path.display()))?;
        let len = repair_tail(&file, &spec.path).map_err(|e| format!("cannot repair {}: {e}", spec.path.display()))?;
        let (tx, rx) = mpsc::channel(FILE_BATCH_MAX * 2);
        let path = spec.path.clone();
        std::thread::Builder::new()
            .name("hookbridge-file-sink".into())
            .spawn(move || write_loop(file, path, len, rx))
            .map_err(|e| format!("cannot start writer thread: {e}"))?;
        Ok(FileSink { tx, path: spec.path.clone() })
    }

    /// Appends lines (one or several events' worth) in one write, on disk when this returns `Ok`.
    async fn append(&self, lines: Vec<u8>) -> Result<(), SinkError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((lines, reply)).await.map_err(|_| SinkError::retryable("file writer stopped"))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SinkError::retryable(format!("{}: {e}", self.path.display()))),
            Err(_) => Err(SinkError::retryable("file writer stopped")),
        }
    }

    /// Renders every event (an event that cannot be rendered fails alone, permanently) and appends the lines
    /// of the others together.
    async fn append_all(&self, events: &[&Event]) -> Vec<Result<(), SinkError>> {
        let mut lines = Vec::with_capacity(events.iter().map(|e| e.body.len() + 256).sum());
        let mut results: Vec<Result<(), SinkError>> = events.iter().map(|e| render(e, &mut lines)).collect();
        if lines.is_empty() {
            return results;
        }
        if let Err(e) = self.append(lines).await {
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(e.clone());
            }
        }
        results
    }
}

/// Appends one JSON line to `out`: `{"id","source","type","time","headers","body"}`, headers sorted by name
/// (the last of a repeated one kept). The body is embedded as it arrived; the only change is that raw line
/// breaks (which in valid JSON can only be whitespace between tokens) become spaces, so the line stays one
/// line. A body that was not checked at ingress ([`Event::body_is_json`]) is parsed first; on an error
/// nothing is appended.
fn render(event: &Event, out: &mut Vec<u8>) -> Result<(), SinkError> {
    if !event.body_is_json {
        let text = std::str::from_utf8(&event.body).map_err(|_| SinkError::permanent("body is not UTF-8"))?;
        let flat;
        let text = if text.contains(['\n', '\r']) {
            flat = text.replace(['\n', '\r'], " ");
            flat.as_str()
        } else {
            text
        };
        serde_json::from_str::<&serde_json::value::RawValue>(text)
            .map_err(|e| SinkError::permanent(format!("body is not JSON: {e}")))?;
    }
    let start = out.len();
    let string = |out: &mut Vec<u8>, s: &str| serde_json::to_writer(&mut *out, s).map_err(|e| e.to_string());
    let written = (|| {
        out.extend_from_slice(b"{\"id\":");
        string(out, &event.id)?;
        out.extend_from_slice(b",\"source\":");
        string(out, &event.source)?;
        out.extend_from_slice(b",\"type\":");
        string(out, &event.event_type)?;
        out.extend_from_slice(b",\"time\":");
        string(out, &event.time_rfc3339())?;
        out.extend_from_slice(b",\"headers\":{");
        let mut headers: Vec<(&str, &str)> = event.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // Stable: of a repeated name, the last stays last, and is the one kept.
        headers.sort_by(|a, b| a.0.cmp(b.0));
        let mut first = true;
        for (i, (k, v)) in headers.iter().enumerate() {
            if headers.get(i + 1).is_some_and(|next| next.0 == *k) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            string(out, k)?;
            out.push(b':');
            string(out, v)?;
        }
        out.extend_from_slice(b"},\"body\":");
        let body_at = out.len();
        out.extend_from_slice(&event.body);
        for b in &mut out[body_at..] {
            if *b == b'\n' || *b == b'\r' {
                *b = b' ';
            }
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    })();
    written.map_err(|e: String| {
        out.truncate(start);
        SinkError::permanent(e)
    })
}

/// How much of the file's end is read at a time when looking for its last complete line.
const TAIL_CHUNK: usize = 64 * 1024;

/// Cuts a torn last line off `file` (one that does not end with a newline), so that the file ends after its
/// last complete line; returns the length kept. An intact file is left as it is.
fn repair_tail(file: &File, path: &std::path::Path) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let mut end = len;
    let mut buf = vec![0u8; TAIL_CHUNK];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(TAIL_CHUNK as u64);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(TAIL_CHUNK)];
        file.read_exact_at(chunk, start)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(len);
        }
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    file.set_len(keep)?;
    file.sync_data()?;
    tracing::warn!(
        path = %path.display(),
        cut = len - keep,
        "file sink: cut a torn last line left by an interrupted write (its events were not acknowledged and are written again)"
    );
    Ok(keep)
}

fn write_loop(mut file: File, path: PathBuf, mut len: u64, mut rx: mpsc::Receiver<Job>) {
    // Set when a failed write could not be rolled back: the tail is repaired before the next write.
    let mut torn = false;
    while let Some(first) = rx.blocking_recv() {
        // Let a batch gather: one fsync costs about as much CPU for one line as for hundreds.
        if rx.is_empty() {
            std::thread::sleep(FILE_BATCH_WINDOW);
        }
        let mut batch = vec![first];
        while batch.len() < FILE_BATCH_MAX {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let total: u64 = batch.iter().map(|(l, _)| l.len() as u64).sum();
        if torn {
            match repair_tail(&file, &path) {
                Ok(kept) => {
                    len = kept;
                    torn = false;
                }
                Err(e) => {
                    let e = format!("cannot repair the file after a failed write: {e}");
                    for (_, reply) in batch {
                        let _ = reply.send(Err(e.clone()));
                    }
                    continue;
                }
            }
        }
        let result = write_all_vectored(&mut file, &batch).and_then(|()| file.sync_data()).map_err(|e| e.to_string());
        match &result {
            Ok(()) => len += total,
            Err(e) => {
                // ENOSPC, EIO...: whatever part of the batch reached the file goes, so that the next write
                // does not glue its first line onto a torn one.
                if let Err(undo) = file.set_len(len).and_then(|()| file.sync_data()) {
                    tracing::error!(path = %path.display(), error = %e, undo = %undo, "file sink: a failed write could not be rolled back; repairing before the next one");
                    torn = true;
                }
            }
        }
        for (_, reply) in batch {
            let _ = reply.send(result.clone());
        }
    }
}

/// Writes every job's lines, in order, with as few `writev`s as the kernel allows (no copy into one buffer).
fn write_all_vectored(file: &mut File, jobs: &[Job]) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = jobs.iter().map(|(l, _)| std::io::IoSlice::new(l)).collect();
    let mut rest = &mut slices[..];
    // Drops leading empty slices, so that only a write of nothing at all can return 0.
    std::io::IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Sink for FileSink {
    fn deliver<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut line = Vec::with_capacity(event.body.len() + 256);
            render(event, &mut line)?;
            self.append(line).await
        })
    }

    fn batch_max(&self) -> usize {
        FILE_BATCH_MAX
    }

    fn deliver_batch<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(self.append_all(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn appends_one_json_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/events.jsonl");
        let sink = FileSink::open(&FileSinkSpec { path: path.clone() }).unwrap();
        let mut event = Event {
            id: "01".into(),
            source: "clockify".into(),
            event_type: "NEW_TIME_ENTRY".into(),
            received_at_ms: 0,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"{\n  \"id\": \"x\",\n  \"text\": \"a\\nb\"\n}"),
            dedup_key: String::new(),
            ordering_key: None,
            body_is_json: false,
        };
        sink.deliver(&event).await.unwrap();
        event.body = Bytes::from_static(b"not json");
        assert_eq!(sink.deliver(&event).await.unwrap_err().class(), "permanent");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["type"], "NEW_TIME_ENTRY");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["body"]["text"], "a\nb");
    }

    /// The line is built by hand: its bytes are those the format promises, whether the body was checked at
    /// ingress or is checked here, and a body that is not JSON leaves nothing behind.
    #[test]
    fn a_line_is_rendered_exactly() {
        let mut event = Event {
            id: "a\"b".into(),
            source: "clockify".into(),
            event_type: "NEW_TIME_ENTRY".into(),
            received_at_ms: 1_764_633_600_123,
            headers: vec![("x-b".into(), "2".into()), ("x-a".into(), "old".into()), ("x-a".into(), "é\n".into())],
            body: Bytes::from_static(b"{\r\n \"k\": \"v\\n\"}"),
            dedup_key: String::new(),
            ordering_key: None,
            body_is_json: true,
        };
        let expected = "{\"id\":\"a\\\"b\",\"source\":\"clockify\",\"type\":\"NEW_TIME_ENTRY\",\
                        \"time\":\"2025-12-02T00:00:00.123Z\",\"headers\":{\"x-a\":\"é\\n\",\"x-b\":\"2\"},\
                        \"body\":{   \"k\": \"v\\n\"}}\n";
        let mut out = b"before".to_vec();
        render(&event, &mut out).unwrap();
        assert_eq!(std::str::from_utf8(&out[6..]).unwrap(), expected);
        event.body_is_json = false;
        let mut unchecked = Vec::new();
        render(&event, &mut unchecked).unwrap();
        assert_eq!(unchecked, &out[6..]);
        event.body = Bytes::from_static(b"{\"k\":");
        assert_eq!(render(&event, &mut out).unwrap_err().class(), "permanent");
        assert_eq!(out.len(), 6 + expected.len(), "a refused body appends nothing");
    }

    /// A batch is written together; an event that cannot be rendered fails alone.
    #[tokio::test]
    async fn a_batch_appends_the_lines_it_can_render() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let sink = FileSink::open(&FileSinkSpec { path: path.clone() }).unwrap();
        let event = |id: &str, body: &'static [u8]| Event {
            id: id.into(),
            source: "clockify".into(),
            event_type: "NEW_TIME_ENTRY".into(),
            received_at_ms: 0,
            headers: vec![],
            body: Bytes::from_static(body),
            dedup_key: String::new(),
            ordering_key: None,
            body_is_json: false,
        };
        let (a, bad, c) = (event("a", b"{\"n\":1}"), event("b", b"\xff"), event("c", b"[2]"));
        let results = sink.deliver_batch(&[&a, &bad, &c]).await;
        assert_eq!(results[0], Ok(()));
        assert_eq!(results[1].as_ref().unwrap_err().class(), "permanent");
        assert_eq!(results[2], Ok(()));
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> =
            text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string()).collect();
        assert_eq!(ids, ["\"a\"", "\"c\""]);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_at_open_and_every_line_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let event = Event {
            id: "after".into(),
            source: "clockify".into(),
            event_type: "NEW_TIME_ENTRY".into(),
            received_at_ms: 0,
            headers: vec![],
            body: Bytes::from_static(b"{}"),
            dedup_key: String::new(),
            ordering_key: None,
            body_is_json: false,
        };
        // A torn line longer than one chunk of the backwards search, after a complete one.
        let torn = format!("{{\"id\":\"torn\",\"body\":\"{}", "x".repeat(TAIL_CHUNK + 10));
        std::fs::write(&path, format!("{{\"id\":\"kept\"}}\n{torn}")).unwrap();
        let sink = FileSink::open(&FileSinkSpec { path: path.clone() }).unwrap();
        sink.deliver(&event).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["kept", "after"]);
        // A file that is only a torn line is emptied; an intact one is left as it is.
        std::fs::write(&path, "{\"id\":").unwrap();
        drop(FileSink::open(&FileSinkSpec { path: path.clone() }).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        std::fs::write(&path, "{}\n").unwrap();
        drop(FileSink::open(&FileSinkSpec { path: path.clone() }).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");
    }
}
