//! Queries: every word of the query must match (see [`crate::tokenizer`]), filtered by
//! conversation, sender and send time, newest first in timeline order.

use std::ops::Bound;

use meridian_model::{ConversationId, EventId, OrderKey};
use tantivy::collector::TopDocs;
use tantivy::query::{
    AllQuery, BooleanQuery, Occur, PhraseQuery, Query, RangeQuery, TermQuery, TermSetQuery,
};
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::snippet::SnippetGenerator;
use tantivy::{Order, TantivyDocument, Term};

use crate::index::SearchIndex;
use crate::tokenizer::{query_words, QueryWord};
use crate::SearchError;

/// What to look for.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// The words; a query without words (only punctuation) matches nothing.
    pub text: String,
    /// Only these conversations (the caller's); empty matches nothing.
    pub conversations: Vec<ConversationId>,
    pub sender: Option<String>,
    /// Sent strictly after / before (ms since the epoch).
    pub sent_after_ms: Option<u64>,
    pub sent_before_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub message_id: EventId,
    pub conversation_id: ConversationId,
    pub order_key: OrderKey,
}

#[derive(Debug, Clone, Default)]
pub struct HitPage {
    /// Newest first (order key descending).
    pub hits: Vec<Hit>,
    /// No more hits below the last one.
    pub exhausted: bool,
}

/// Where a query matched in one text: the fragment shown and the matched ranges within it,
/// in characters (Unicode scalar values) from the fragment's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Highlight {
    pub fragment: String,
    pub ranges: Vec<(usize, usize)>,
}

fn build(index: &SearchIndex, q: &SearchQuery, below: Option<&OrderKey>) -> Option<Box<dyn Query>> {
    let f = &index.fields;
    let words = query_words(&q.text);
    if words.is_empty() || q.conversations.is_empty() {
        return None;
    }
    let mut must: Vec<(Occur, Box<dyn Query>)> = words
        .into_iter()
        .map(|w| -> (Occur, Box<dyn Query>) {
            let term = |t: &str| Term::from_field_text(f.text, t);
            match w {
                QueryWord::Term(t) => (
                    Occur::Must,
                    Box::new(TermQuery::new(term(&t), IndexRecordOption::WithFreqs)),
                ),
                QueryWord::Phrase(ts) => (
                    Occur::Must,
                    Box::new(PhraseQuery::new(ts.iter().map(|t| term(t)).collect())),
                ),
            }
        })
        .collect();
    let conversations = q
        .conversations
        .iter()
        .map(|c| Term::from_field_text(f.conversation_id, c.as_str()));
    must.push((Occur::Must, Box::new(TermSetQuery::new(conversations))));
    if let Some(sender) = &q.sender {
        must.push((
            Occur::Must,
            Box::new(TermQuery::new(
                Term::from_field_text(f.sender, sender),
                IndexRecordOption::Basic,
            )),
        ));
    }
    if q.sent_after_ms.is_some() || q.sent_before_ms.is_some() {
        let lo = q.sent_after_ms.map_or(Bound::Unbounded, |v| {
            Bound::Excluded(Term::from_field_u64(f.sent_at, v))
        });
        let hi = q.sent_before_ms.map_or(Bound::Unbounded, |v| {
            Bound::Excluded(Term::from_field_u64(f.sent_at, v))
        });
        must.push((Occur::Must, Box::new(RangeQuery::new(lo, hi))));
    }
    if let Some(k) = below {
        // Order keys tie on the clock only across regions; the exact bound is applied to
        // the hits (see `run`).
        must.push((
            Occur::Must,
            Box::new(RangeQuery::new(
                Bound::Unbounded,
                Bound::Included(Term::from_field_u64(f.hlc, k.hlc.0)),
            )),
        ));
    }
    Some(Box::new(BooleanQuery::new(must)))
}

pub(crate) fn run(
    index: &SearchIndex,
    q: &SearchQuery,
    below: Option<&OrderKey>,
    want: usize,
) -> Result<HitPage, SearchError> {
    let Some(query) = build(index, q, below) else {
        return Ok(HitPage {
            hits: Vec::new(),
            exhausted: true,
        });
    };
    let searcher = index.reader.searcher();
    let f = &index.fields;
    // Hits come by clock; whole clock values are kept so ties are ordered by the full key.
    // A few more than wanted are fetched, more if one clock value fills the fetch.
    let mut fetch = want + want / 2 + 8;
    loop {
        let top = searcher.search(
            &*query,
            &TopDocs::with_limit(fetch).order_by_fast_field::<u64>("hlc", Order::Desc),
        )?;
        let got = top.len();
        let mut hits = Vec::with_capacity(got);
        for (_, addr) in &top {
            let doc: TantivyDocument = searcher.doc(*addr)?;
            let okey = doc
                .get_first(f.order_key)
                .and_then(|v| v.as_bytes())
                .and_then(|b| OrderKey::from_bytes(b).ok());
            let Some(okey) = okey else { continue };
            if below.is_some_and(|b| &okey >= b) {
                continue;
            }
            let Ok(conversation_id) = doc
                .get_first(f.conversation_id)
                .and_then(|v| v.as_str())
                .map(|s| ConversationId::parse(s.to_string()))
                .unwrap_or_else(|| ConversationId::parse(String::new()))
            else {
                continue;
            };
            hits.push(Hit {
                message_id: okey.event_id,
                conversation_id,
                order_key: okey,
            });
        }
        let exhausted = got < fetch;
        if !exhausted {
            // The last clock value may continue beyond the fetch: leave it to the next page.
            let last_hlc = top.last().and_then(|(h, _)| *h);
            let kept: Vec<Hit> = hits
                .iter()
                .filter(|h| Some(h.order_key.hlc.0) != last_hlc)
                .cloned()
                .collect();
            if kept.is_empty() {
                // One clock value filled the whole fetch: fetch more.
                fetch = fetch.saturating_mul(2);
                continue;
            }
            hits = kept;
        }
        hits.sort_by(|a, b| b.order_key.cmp(&a.order_key));
        return Ok(HitPage { hits, exhausted });
    }
}

pub(crate) fn highlights(
    index: &SearchIndex,
    q: &SearchQuery,
    texts: &[String],
) -> Result<Vec<Vec<Highlight>>, SearchError> {
    let query: Box<dyn Query> = match build(index, q, None) {
        Some(query) => query,
        None => Box::new(AllQuery),
    };
    let searcher = index.reader.searcher();
    let mut generator = SnippetGenerator::create(&searcher, &*query, index.fields.text)?;
    generator.set_max_num_chars(160);
    Ok(texts
        .iter()
        .map(|text| {
            let snippet = generator.snippet(text);
            if snippet.highlighted().is_empty() {
                return Vec::new();
            }
            let fragment = snippet.fragment();
            let chars = |byte: usize| fragment[..byte.min(fragment.len())].chars().count();
            let mut ranges: Vec<(usize, usize)> = snippet
                .highlighted()
                .iter()
                .map(|r| (chars(r.start), chars(r.end)))
                .collect();
            // CJK matches overlap (a character and its bigrams): merge them.
            ranges.sort_unstable();
            let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
            for (s, e) in ranges {
                match merged.last_mut() {
                    Some(last) if s <= last.1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            vec![Highlight {
                fragment: fragment.to_string(),
                ranges: merged,
            }]
        })
        .collect())
}
