//! The index: schema, documents, and the checkpoint kept in each commit's payload.

use std::collections::BTreeMap;
use std::path::Path;

use meridian_store::search_feed::{IndexableMessage, TimelineScanPos};
use serde::{Deserialize, Serialize};
use tantivy::directory::MmapDirectory;
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STORED, STRING,
};
use tantivy::{Index, IndexReader, ReloadPolicy, TantivyDocument, Term};

use crate::tokenizer::{analyzer, ANALYZER};
use crate::SearchError;

/// The fields of a message document. Only what a query filters or sorts on, and what a hit
/// needs to be looked up in the store, is kept: the text is indexed, not stored (the store
/// has it), which keeps the index small.
#[derive(Clone, Copy)]
pub(crate) struct Fields {
    /// The message id (hyphenated): the key of re-adds (delete, then add). Not stored: the
    /// stored order key holds it.
    pub message_id: Field,
    pub conversation_id: Field,
    pub sender: Field,
    /// The order key's clock: the sort key (newest first) and the paging bound.
    pub hlc: Field,
    pub sent_at: Field,
    /// The whole order key, stored: ties on `hlc` are ordered by it.
    pub order_key: Field,
    pub text: Field,
}

pub(crate) fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let text_options = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let fields = Fields {
        message_id: b.add_text_field("message_id", STRING),
        conversation_id: b.add_text_field("conversation_id", STRING | STORED),
        sender: b.add_text_field("sender", STRING),
        hlc: b.add_u64_field("hlc", INDEXED | FAST),
        sent_at: b.add_u64_field("sent_at", INDEXED | FAST),
        order_key: b.add_bytes_field("order_key", STORED),
        text: b.add_text_field("text", text_options),
    };
    (b.build(), fields)
}

pub(crate) struct SearchIndex {
    pub index: Index,
    pub reader: IndexReader,
    pub fields: Fields,
}

impl SearchIndex {
    pub fn open(dir: &Path) -> Result<Self, SearchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| SearchError::Directory(format!("{}: {e}", dir.display())))?;
        let (schema, fields) = schema();
        let open = || -> Result<Index, SearchError> {
            let directory = MmapDirectory::open(dir)
                .map_err(|e| SearchError::Directory(format!("{}: {e}", dir.display())))?;
            Ok(Index::open_or_create(directory, schema.clone())?)
        };
        let index = match open() {
            // An index written with another schema (an older version of this crate) is
            // derived data: start it again, and the indexer rebuilds it from the store.
            Err(SearchError::Index(tantivy::TantivyError::SchemaError(e))) => {
                tracing::warn!(dir = %dir.display(), error = %e, "search index of another schema: rebuilding it");
                std::fs::remove_dir_all(dir)
                    .and_then(|()| std::fs::create_dir_all(dir))
                    .map_err(|e| SearchError::Directory(format!("{}: {e}", dir.display())))?;
                open()?
            }
            other => other?,
        };
        index.tokenizers().register(ANALYZER, analyzer());
        // Reloaded by the indexer after each commit, so a query never sees a half-written
        // commit and the indexer decides when results move.
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Self {
            index,
            reader,
            fields,
        })
    }

    pub fn document(&self, m: &IndexableMessage) -> TantivyDocument {
        let f = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_text(f.message_id, m.message_id.to_string());
        doc.add_text(f.conversation_id, m.conversation_id.as_str());
        doc.add_text(f.sender, &m.sender);
        doc.add_u64(f.hlc, m.order_key.hlc.0);
        doc.add_u64(f.sent_at, m.sent_at_ms);
        doc.add_bytes(f.order_key, &m.order_key.to_bytes());
        doc.add_text(f.text, message_text(&m.body_json));
        doc
    }

    pub fn id_term(&self, m: &IndexableMessage) -> Term {
        Term::from_field_text(self.fields.message_id, &m.message_id.to_string())
    }
}

/// The searchable text of a message body: every string in the JSON body (a text message's
/// `text`, a file's name, a card's title...), one per line. A body that is not JSON is
/// searched as it is.
pub fn message_text(body_json: &str) -> String {
    fn walk(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::String(s) => {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(s);
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(body_json) {
        Ok(v) => {
            let mut out = String::new();
            walk(&v, &mut out);
            out
        }
        Err(_) => body_json.to_string(),
    }
}

/// One stream's position in its search feed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FeedPos {
    pub instance: u64,
    pub seq: u64,
}

/// What the committed index holds, written as the payload of every commit: the feed
/// positions it covers, and while a rebuild runs, how far the timeline scan got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndexCheckpoint {
    pub streams: BTreeMap<String, FeedPos>,
    /// `Some` while rebuilding: the timeline key the scan continues after (hex; empty: from
    /// the start). `streams` are then the feed positions taken when the rebuild began.
    #[serde(default)]
    pub rebuild_after: Option<String>,
}

impl IndexCheckpoint {
    /// The checkpoint of the last commit; `None` for an index never committed to.
    pub fn load(index: &Index) -> Result<Option<Self>, SearchError> {
        let metas = index.load_metas()?;
        match metas.payload {
            None => Ok(None),
            Some(p) => serde_json::from_str(&p)
                .map(Some)
                .map_err(|e| SearchError::Checkpoint(e.to_string())),
        }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn rebuild_pos(&self) -> Option<Option<TimelineScanPos>> {
        self.rebuild_after.as_ref().map(|h| {
            if h.is_empty() {
                None
            } else {
                hex::decode(h).ok().map(TimelineScanPos::from_key)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_text_takes_every_string_of_the_body() {
        assert_eq!(
            message_text(r#"{"text":"hello","file":{"name":"a.pdf","size":3},"tags":["x"]}"#),
            // serde_json's maps are sorted by key: file, tags, text.
            "a.pdf\nx\nhello"
        );
        assert_eq!(message_text("not json"), "not json");
    }

    #[test]
    fn checkpoints_round_trip_through_the_payload() {
        let mut cp = IndexCheckpoint::default();
        cp.streams
            .insert("SYNC_us".into(), FeedPos { instance: 7, seq: 42 });
        cp.rebuild_after = Some(hex::encode(b"T/abc"));
        let back: IndexCheckpoint = serde_json::from_str(&cp.encode()).unwrap();
        assert_eq!(back, cp);
    }
}
