//! The one analyzer of message text, used both to index and to query:
//!
//! - Space-separated scripts (Latin, Cyrillic, Greek, ...): a word is a run of letters and
//!   digits; lowercased and folded to ASCII where a folding exists (`Café` → `cafe`), so
//!   matching ignores case and accents. No stemming and no stopwords.
//! - Chinese, Japanese and Korean: every run of CJK characters is indexed as its overlapping
//!   bigrams plus its single characters (`東京大学` → `東`, `東京`, `京`, `京大`, `大`, `大学`,
//!   `学`), each bigram at the position of its first character. A query word of two or more
//!   CJK characters becomes the phrase of its bigrams, so it matches exactly where those
//!   characters stand together; one character matches the character. No dictionary to ship,
//!   and a word is found whatever segmentation a dictionary would have chosen (recall over
//!   the test set in `tests/cjk_recall.rs`; docs/design.md §Search has the figure).

use tantivy::tokenizer::{
    AsciiFoldingFilter, LowerCaser, RemoveLongFilter, TextAnalyzer, Token, TokenStream, Tokenizer,
};

/// The name the analyzer is registered under in the index.
pub const ANALYZER: &str = "meridian";

/// Tokens longer than this many bytes are dropped (base64 blobs, long URLs).
const MAX_TOKEN_BYTES: usize = 64;

/// Whether `c` is written without spaces between words (Han, kana, Hangul and their
/// compatibility and extension blocks).
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF      // Hangul Jamo
        | 0x2E80..=0x2FDF    // CJK radicals, Kangxi radicals
        | 0x3040..=0x30FF    // Hiragana, Katakana
        | 0x3100..=0x312F    // Bopomofo
        | 0x3130..=0x318F    // Hangul compatibility Jamo
        | 0x31F0..=0x31FF    // Katakana phonetic extensions
        | 0x3400..=0x4DBF    // CJK extension A
        | 0x4E00..=0x9FFF    // CJK unified ideographs
        | 0xA960..=0xA97F    // Hangul Jamo extended A
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xD7B0..=0xD7FF    // Hangul Jamo extended B
        | 0xF900..=0xFAFF    // CJK compatibility ideographs
        | 0xFF66..=0xFF9F    // half-width Katakana
        | 0x20000..=0x323AF  // CJK extensions B..H
    )
}

/// One run of the text: a word of a space-separated script, or a run of CJK characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run<'a> {
    pub text: &'a str,
    pub offset: usize,
    pub cjk: bool,
}

/// Splits `text` into runs; everything that is neither a letter nor a digit separates them.
pub(crate) fn runs(text: &str) -> Vec<Run<'_>> {
    let mut out = Vec::new();
    let mut start: Option<(usize, bool)> = None;
    for (i, c) in text.char_indices() {
        let class = if is_cjk(c) {
            Some(true)
        } else if c.is_alphanumeric() {
            Some(false)
        } else {
            None
        };
        match (start, class) {
            (Some((_, cjk)), Some(k)) if cjk == k => {}
            (Some((s, cjk)), _) => {
                out.push(Run {
                    text: &text[s..i],
                    offset: s,
                    cjk,
                });
                start = class.map(|k| (i, k));
            }
            (None, Some(k)) => start = Some((i, k)),
            (None, None) => {}
        }
    }
    if let Some((s, cjk)) = start {
        out.push(Run {
            text: &text[s..],
            offset: s,
            cjk,
        });
    }
    out
}

/// Emits words whole and CJK runs as characters and bigrams (see the module docs).
#[derive(Clone, Default)]
pub struct MeridianTokenizer {
    tokens: Vec<Token>,
}

pub struct MeridianTokenStream<'a> {
    tokens: &'a mut [Token],
    next: usize,
}

impl Tokenizer for MeridianTokenizer {
    type TokenStream<'a> = MeridianTokenStream<'a>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> MeridianTokenStream<'a> {
        self.tokens.clear();
        let mut position = 0;
        for run in runs(text) {
            if !run.cjk {
                self.tokens.push(Token {
                    offset_from: run.offset,
                    offset_to: run.offset + run.text.len(),
                    position,
                    text: run.text.to_string(),
                    position_length: 1,
                });
                position += 1;
                continue;
            }
            let chars: Vec<(usize, char)> = run.text.char_indices().collect();
            for (i, &(at, c)) in chars.iter().enumerate() {
                let from = run.offset + at;
                let to = from + c.len_utf8();
                self.tokens.push(Token {
                    offset_from: from,
                    offset_to: to,
                    position,
                    text: c.to_string(),
                    position_length: 1,
                });
                if let Some(&(_, d)) = chars.get(i + 1) {
                    self.tokens.push(Token {
                        offset_from: from,
                        offset_to: to + d.len_utf8(),
                        position,
                        text: format!("{c}{d}"),
                        position_length: 1,
                    });
                }
                position += 1;
            }
        }
        MeridianTokenStream {
            tokens: &mut self.tokens,
            next: 0,
        }
    }
}

impl TokenStream for MeridianTokenStream<'_> {
    fn advance(&mut self) -> bool {
        if self.next < self.tokens.len() {
            self.next += 1;
            true
        } else {
            false
        }
    }

    fn token(&self) -> &Token {
        &self.tokens[self.next - 1]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.next - 1]
    }
}

/// The analyzer: runs, lowercased, ASCII-folded, overlong tokens dropped.
pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(MeridianTokenizer::default())
        .filter(RemoveLongFilter::limit(MAX_TOKEN_BYTES))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .build()
}

/// How one word of a query matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryWord {
    /// One indexed token.
    Term(String),
    /// Consecutive tokens (the bigrams of a CJK run of three or more characters).
    Phrase(Vec<String>),
}

/// The words of a query, each analyzed as the index analyzes text.
pub fn query_words(q: &str) -> Vec<QueryWord> {
    let mut analyzer = analyzer();
    let mut out = Vec::new();
    for run in runs(q) {
        let mut tokens = Vec::new();
        let mut stream = analyzer.token_stream(run.text);
        while stream.advance() {
            tokens.push(stream.token().text.clone());
        }
        if !run.cjk {
            out.extend(tokens.into_iter().map(QueryWord::Term));
            continue;
        }
        let bigrams: Vec<String> = tokens.into_iter().filter(|t| t.chars().count() == 2).collect();
        match bigrams.len() {
            0 => out.push(QueryWord::Term(run.text.to_lowercase())),
            1 => out.push(QueryWord::Term(bigrams.into_iter().next().unwrap_or_default())),
            _ => out.push(QueryWord::Phrase(bigrams)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Vec<(String, usize)> {
        let mut a = analyzer();
        let mut s = a.token_stream(text);
        let mut out = Vec::new();
        while s.advance() {
            out.push((s.token().text.clone(), s.token().position));
        }
        out
    }

    #[test]
    fn words_are_lowercased_and_folded() {
        let t: Vec<String> = tokens("Café RÉSUMÉ, naïve-Straße 42")
            .into_iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(t, ["cafe", "resume", "naive", "strasse", "42"]);
    }

    #[test]
    fn cjk_runs_are_characters_and_bigrams_at_their_first_characters_position() {
        assert_eq!(
            tokens("東京大"),
            [
                ("東".to_string(), 0),
                ("東京".to_string(), 0),
                ("京".to_string(), 1),
                ("京大".to_string(), 1),
                ("大".to_string(), 2)
            ]
        );
    }

    #[test]
    fn mixed_script_text_splits_at_script_changes() {
        let t: Vec<String> = tokens("用iPhone拍照").into_iter().map(|t| t.0).collect();
        assert_eq!(t, ["用", "iphone", "拍", "拍照", "照"]);
    }

    #[test]
    fn query_words_make_phrases_of_cjk_runs() {
        assert_eq!(
            query_words("Meeting 東京大学 会"),
            [
                QueryWord::Term("meeting".into()),
                QueryWord::Phrase(vec!["東京".into(), "京大".into(), "大学".into()]),
                QueryWord::Term("会".into()),
            ]
        );
        assert_eq!(query_words("会议"), [QueryWord::Term("会议".into())]);
        assert!(query_words(" ,.!? ").is_empty());
    }
}
