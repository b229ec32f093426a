//! Issue 12 item 3: recall (and precision) of the CJK bigram analyzer on a small test set.
//!
//! Each sentence is written with its words separated by `|` as a person would segment it;
//! the index gets the sentence as people write it (no separators in Chinese and Japanese,
//! Korean with its spaces between phrases). A query is one word; the sentences relevant to
//! it are those whose segmentation holds that word. Recall: relevant sentences found, over
//! relevant sentences; precision: found sentences that are relevant, over found sentences.
//! The figures are printed (`cargo test -p meridian-search --test cjk_recall -- --nocapture`)
//! and quoted in docs/design.md.

use std::collections::BTreeSet;
use std::sync::Arc;

use meridian_model::{ConversationId, EventId, Hlc, OrderKey, RegionId};
use meridian_search::{IndexBuilder, Search, SearchConfig, SearchMetrics, SearchQuery};
use meridian_store::search_feed::IndexableMessage;
use meridian_store::testing::TempStore;

/// (language, segmented sentence). Korean phrases are separated by spaces as written, and
/// words within a phrase by `|` (a noun and its particle: `회의|가`).
const SENTENCES: &[(&str, &str)] = &[
    ("zh", "明天|在|东京|大学|开会"),
    ("zh", "会议|改|到|下午|三点"),
    ("zh", "我|已经|把|报告|发|给|经理|了"),
    ("zh", "北京|的|天气|今天|很|好"),
    ("zh", "请|把|会议|记录|发|到|群|里"),
    ("zh", "东京都|的|人口|很|多"),
    ("zh", "京都|的|寺庙|很|漂亮"),
    ("zh", "大学生|在|图书馆|学习"),
    ("zh", "他|是|北京|大学|的|学生"),
    ("zh", "中国|和|日本|的|合作"),
    ("zh", "电话|会议|时间|改|了"),
    ("zh", "下周|去|上海|出差"),
    ("zh", "上海|的|会议|取消|了"),
    ("zh", "经理|说|报告|写|得|很|好"),
    ("zh", "我们|明天|见面|吧"),
    ("zh", "这个|项目|的|预算|不够"),
    ("zh", "预算|已经|批准|了"),
    ("zh", "学生|们|在|开会"),
    ("ja", "今日|は|東京|で|会議|が|あります"),
    ("ja", "明日|の|会議|は|中止|です"),
    ("ja", "京都|に|旅行|に|行きました"),
    ("ja", "東京都|の|人口|は|多い"),
    ("ja", "報告書|を|送りました"),
    ("ja", "大学|の|先生|に|会いました"),
    ("ja", "新しい|プロジェクト|が|始まります"),
    ("ja", "プロジェクト|の|予算|を|確認|して|ください"),
    ("ja", "電話|で|話しましょう"),
    ("ja", "会議室|を|予約|しました"),
    ("ja", "来週|大阪|に|出張|します"),
    ("ja", "大阪|の|会議|に|出ます"),
    ("ko", "내일 서울|에서 회의|가 있어요"),
    ("ko", "회의|는 오후|에 시작|합니다"),
    ("ko", "서울|은 오늘 날씨|가 좋아요"),
    ("ko", "보고서|를 보냈습니다"),
    ("ko", "프로젝트 예산|을 확인|해 주세요"),
    ("ko", "부산|으로 출장|을 갑니다"),
    ("ko", "회의실|을 예약|했어요"),
    ("ko", "대학교|에서 공부|해요"),
    ("ko", "전화|로 이야기|해요"),
    ("ko", "서울대학교|는 유명|해요"),
];

const QUERIES: &[&str] = &[
    "东京",
    "大学",
    "会议",
    "报告",
    "北京",
    "京都",
    "学生",
    "经理",
    "上海",
    "预算",
    "开会",
    "电话",
    "日本",
    "东京都",
    "会議",
    "東京",
    "プロジェクト",
    "予算",
    "大阪",
    "電話",
    "人口",
    "旅行",
    "회의",
    "서울",
    "보고서",
    "예산",
    "출장",
    "회의실",
    "대학교",
    "전화",
    "프로젝트",
];

/// The sentence as written: Korean keeps its spaces, nobody writes the `|`.
fn written(segmented: &str) -> String {
    segmented.replace('|', "")
}

fn words(segmented: &str) -> BTreeSet<String> {
    segmented
        .split(['|', ' '])
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// What a word tokenizer (split at spaces and punctuation, as for English) would find: the
/// query equal to a whole space-separated run.
fn whitespace_hit(text: &str, q: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric()).any(|w| w == q)
}

#[tokio::test]
async fn item3_cjk_bigrams_find_every_word_of_the_test_set() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cid = ConversationId::parse(format!("g_{:032x}", 1))?;
    let region = RegionId::parse("us")?;
    let mut ids = Vec::new();
    let mut builder = IndexBuilder::create(dir.path(), 1, 16)?;
    for (i, (_, s)) in SENTENCES.iter().enumerate() {
        let id = EventId::from_bytes(&(i as u128 + 1).to_be_bytes())?;
        ids.push(id);
        builder.add(&IndexableMessage {
            message_id: id,
            conversation_id: cid.clone(),
            order_key: OrderKey::new(Hlc(1_000 + i as u64), region.clone(), id),
            sender: "ann".into(),
            sent_at_ms: 1_000 + i as u64,
            msg_type: "text".into(),
            body_json: serde_json::json!({ "text": written(s) }).to_string(),
        })?;
    }
    builder.finish()?;
    let store = TempStore::open()?;
    let search = Search::open(
        SearchConfig::new(dir.path()),
        store.store.clone(),
        Arc::new(SearchMetrics::default()),
    )?;

    let (mut relevant, mut found, mut found_relevant) = (0usize, 0usize, 0usize);
    let mut ws_found_relevant = 0usize;
    let mut missed = Vec::new();
    for q in QUERIES {
        let page = search
            .query(
                SearchQuery {
                    text: q.to_string(),
                    conversations: vec![cid.clone()],
                    ..Default::default()
                },
                None,
                100,
            )
            .await?;
        let hits: BTreeSet<EventId> = page.hits.iter().map(|h| h.message_id).collect();
        for (i, (_, s)) in SENTENCES.iter().enumerate() {
            let is_relevant = words(s).contains(*q);
            let hit = hits.contains(&ids[i]);
            relevant += usize::from(is_relevant);
            found += usize::from(hit);
            found_relevant += usize::from(hit && is_relevant);
            if is_relevant && !hit {
                missed.push(format!("{q} in {}", written(s)));
            }
            let ws = whitespace_hit(&written(s), q);
            ws_found_relevant += usize::from(ws && is_relevant);
        }
    }
    let recall = found_relevant as f64 / relevant as f64;
    let precision = found_relevant as f64 / found as f64;
    let ws_recall = ws_found_relevant as f64 / relevant as f64;
    println!(
        "CJK test set: {} sentences, {} queries, {relevant} relevant pairs; bigrams: recall {:.3}, precision {:.3}; \
         whitespace words for comparison: recall {:.3}",
        SENTENCES.len(),
        QUERIES.len(),
        recall,
        precision,
        ws_recall,
    );
    assert!(missed.is_empty(), "missed: {missed:?}");
    assert_eq!(recall, 1.0);
    // Bigrams also match a word inside a longer one (京都 in 東京都): precision pays for
    // recall, and stays high on this set.
    assert!(precision > 0.8, "precision {precision}");
    Ok(())
}
