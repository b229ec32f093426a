//! Issue 12: `GET /v1/search` end to end (gateway -> bus -> applier -> store -> search
//! index), against a real nats-server and the embedded store: who sees what, recalls and
//! deletes-for-me, Chinese, Japanese, Korean and mixed-script queries, paging, bad input,
//! and the same answers in two regions once they converge.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};
use meridian_e2e::{Session, TestRegion, TestRegions};
use reqwest::Method;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn search(s: &Session, q: &str, extra: &str) -> Result<(u16, Value)> {
    s.get(&format!("/v1/search?q={}{extra}", encode(q))).await
}

/// The texts `s` finds for `q`, newest first (one page).
async fn texts(s: &Session, q: &str, extra: &str) -> Result<Vec<String>> {
    let (st, body) = search(s, q, extra).await?;
    if st != 200 {
        bail!("search {q:?}: {st} {body}");
    }
    Ok(body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| m["body"]["text"].as_str().unwrap_or_default().to_string())
        .collect())
}

/// Polls until `s` finds exactly `want` for `q` (the index commits on its own cadence).
async fn wait_texts(s: &Session, q: &str, extra: &str, want: &[&str]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = texts(s, q, extra).await?;
        if got == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{} searching {q:?}{extra}: found {got:?}, expected {want:?}",
                s.user
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the region's index has caught up with everything applied.
async fn caught_up(r: &TestRegion) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (st, body) = r.admin(Method::GET, "/v1/admin/regions", None).await?;
        let s = &body["regions"][0]["search"];
        if st == 200
            && s["lag_events"] == 0
            && s["rebuilding"] == false
            && s["last_commit_ms"].as_u64() > Some(0)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("search never caught up: {st} {body}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_members_find_their_messages_and_nobody_else_does() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let carol = r.user("carol", "tablet").await?;
    let cid = ann.direct("bob").await?;
    let other = carol.direct("ann").await?;
    ann.send(&cid, "c1", "The Quarterly report is ready").await?;
    bob.send(&cid, "c2", "Thanks for the REPORT").await?;
    carol.send(&other, "c3", "Another report, for ann only").await?;

    wait_texts(
        &bob,
        "report",
        "",
        &["Thanks for the REPORT", "The Quarterly report is ready"],
    )
    .await?;
    // Ann is in both conversations; carol only in hers.
    wait_texts(
        &ann,
        "report",
        "",
        &[
            "Another report, for ann only",
            "Thanks for the REPORT",
            "The Quarterly report is ready",
        ],
    )
    .await?;
    wait_texts(&carol, "report", "", &["Another report, for ann only"]).await?;
    // A conversation the caller is not in is not found, as everywhere in the API.
    let (st, body) = search(&carol, "report", &format!("&conversation_id={cid}")).await?;
    assert_eq!(
        (st, body["error"].as_str()),
        (404, Some("conversation_not_found")),
        "{body}"
    );
    // Filters: conversation, sender, time.
    wait_texts(
        &ann,
        "report",
        &format!("&conversation_id={cid}&sender=bob"),
        &["Thanks for the REPORT"],
    )
    .await?;
    let (_, page) = search(&ann, "quarterly", "").await?;
    let hit = &page["messages"][0];
    assert_eq!(hit["conversation_id"], cid.as_str());
    assert_eq!(hit["sender"], "ann");
    assert_eq!(hit["recalled"], false);
    assert!(hit["cursor"].is_string() && hit["message_id"].is_string());
    let h = &hit["highlights"][0];
    assert_eq!(h["fragment"], "The Quarterly report is ready");
    assert_eq!(h["ranges"], json!([[4, 13]]), "{hit}");
    let sent_at = hit["sent_at"].as_u64().unwrap_or_default();
    wait_texts(&ann, "quarterly", &format!("&before={sent_at}"), &[]).await?;
    wait_texts(
        &ann,
        "quarterly",
        &format!("&after={}", sent_at - 1),
        &["The Quarterly report is ready"],
    )
    .await?;

    // Bad input: 400 with the field named.
    for (query, field) in [
        ("/v1/search", "q"),
        ("/v1/search?q=", "q"),
        ("/v1/search?q=x&limit=0", "limit"),
        ("/v1/search?q=x&limit=101", "limit"),
        ("/v1/search?q=x&cursor=not-a-cursor", "cursor"),
        ("/v1/search?q=x&sender=bad%20id", "sender"),
    ] {
        let (st, body) = ann.get(query).await?;
        assert_eq!(st, 400, "{query}: {body}");
        assert_eq!(body["error"], "invalid_argument", "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    let (st, body) = ann.get(&format!("/v1/search?q={}", "x".repeat(257))).await?;
    assert_eq!(st, 400, "{body}");
    // A query of punctuation only finds nothing (it is not an error).
    assert!(texts(&ann, "?! ...", "").await?.is_empty());
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_recalled_and_deleted_for_me_messages_never_appear() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let cid = ann.direct("bob").await?;
    let recalled = ann.send(&cid, "c1", "secret plan A").await?;
    let hidden = ann.send(&cid, "c2", "secret plan B").await?;
    ann.send(&cid, "c3", "secret plan C").await?;
    wait_texts(
        &bob,
        "secret",
        "",
        &["secret plan C", "secret plan B", "secret plan A"],
    )
    .await?;
    caught_up(&r).await?;

    let (st, body) = ann
        .post(
            &format!(
                "/v1/conversations/{cid}/messages/{}/recall",
                recalled["message_id"].as_str().unwrap_or_default()
            ),
            json!({}),
        )
        .await?;
    assert_eq!(st, 200, "{body}");
    let (st, body) = bob
        .delete(&format!(
            "/v1/conversations/{cid}/messages/{}",
            hidden["message_id"].as_str().unwrap_or_default()
        ))
        .await?;
    assert_eq!(st, 204, "{body}");
    // Bob deleted B for himself; A was recalled for everyone.
    wait_texts(&bob, "secret", "", &["secret plan C"]).await?;
    wait_texts(&ann, "secret", "", &["secret plan C", "secret plan B"]).await?;
    // Pages skip them too (a page of one: the hidden ones never take a place).
    let (_, page) = search(&bob, "plan", "&limit=1").await?;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1), "{page}");
    if let Some(c) = page["next_cursor"].as_str() {
        let (_, rest) = search(&bob, "plan", &format!("&limit=1&cursor={c}")).await?;
        assert_eq!(rest["messages"], json!([]), "{rest}");
    }
    r.stop().await
}

/// Issue 12 item 3: Chinese, Japanese and Korean text found by its words, mixed scripts,
/// case and accents folded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_cjk_and_mixed_script_queries() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let cid = ann.direct("bob").await?;
    for (i, text) in [
        "明天在东京大学开会",
        "会议改到 Tokyo 举行",
        "今日は東京で会議があります",
        "내일 서울에서 회의가 있어요",
        "Un café à Zürich",
        "用iPhone拍的照片",
    ]
    .iter()
    .enumerate()
    {
        ann.send(&cid, &format!("c{i}"), text).await?;
    }
    wait_texts(&bob, "东京", "", &["明天在东京大学开会"]).await?;
    for (q, want) in [
        ("东京大学", vec!["明天在东京大学开会"]),
        ("大学 开会", vec!["明天在东京大学开会"]),
        ("東京", vec!["今日は東京で会議があります"]),
        ("会議", vec!["今日は東京で会議があります"]),
        ("会议", vec!["会议改到 Tokyo 举行"]),
        ("tokyo 会议", vec!["会议改到 Tokyo 举行"]),
        ("회의가", vec!["내일 서울에서 회의가 있어요"]),
        ("서울에서", vec!["내일 서울에서 회의가 있어요"]),
        ("CAFE zurich", vec!["Un café à Zürich"]),
        ("Café", vec!["Un café à Zürich"]),
        ("iphone", vec!["用iPhone拍的照片"]),
        ("照片", vec!["用iPhone拍的照片"]),
        // The characters of a word must stand together: 京大 is in 东京大学, 大东 nowhere.
        ("大东", vec![]),
        ("京都", vec![]),
    ] {
        let got = texts(&bob, q, "").await?;
        assert_eq!(got, want, "query {q:?}");
    }
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_pages_newest_first_without_gaps_or_repeats() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let cid = ann.direct("bob").await?;
    let mut sent = Vec::new();
    for i in 0..25 {
        let b = ann
            .send(&cid, &format!("c{i}"), &format!("weekly sync number {i}"))
            .await?;
        sent.push(b["message_id"].as_str().unwrap_or_default().to_string());
        ann.send(&cid, &format!("x{i}"), "unrelated").await?;
    }
    caught_up(&r).await?;
    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 10, "paging did not end");
        let (st, body) = search(&bob, "weekly SYNC", &format!("&limit=10{cursor}")).await?;
        assert_eq!(st, 200, "{body}");
        seen.extend(
            body["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|m| m["message_id"].as_str().unwrap_or_default().to_string()),
        );
        match body["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    sent.reverse();
    assert_eq!(seen, sent, "every match once, newest first");
    assert_eq!(pages, 3);
    r.stop().await
}

/// A restart (and an operator's reindex) keeps every message searchable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_restart_and_reindex_keep_every_message_searchable() -> Result<()> {
    let mut r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let cid = ann.direct("bob").await?;
    for i in 0..30 {
        ann.send(&cid, &format!("c{i}"), &format!("invoice {i}")).await?;
    }
    caught_up(&r).await?;
    r.restart().await?;
    let bob = Session {
        base: r.base.clone(),
        ..bob
    };
    let found: BTreeSet<String> = {
        let (_, body) = search(&bob, "invoice", "&limit=100").await?;
        body["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| m["body"]["text"].to_string())
            .collect()
    };
    assert_eq!(found.len(), 30);
    let (st, body) = r.admin(Method::POST, "/v1/admin/search/reindex", None).await?;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["requested"], true, "{body}");
    caught_up(&r).await?;
    let (_, body) = search(&bob, "invoice", "&limit=100").await?;
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(30), "{body}");
    r.stop().await
}

/// Every region holds every conversation, so every region answers alike once converged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_two_regions_answer_the_same_query_the_same_after_convergence() -> Result<()> {
    let regions = TestRegions::start(&["us", "eu"]).await?;
    let ann = regions.user("us", "ann", "laptop").await?;
    let bob = regions.user("eu", "bob", "phone").await?;
    regions.wait_directory(&["ann", "bob"]).await?;
    let cid = ann.direct("bob").await?;
    for i in 0..6 {
        ann.send(&cid, &format!("a{i}"), &format!("budget draft {i} 预算"))
            .await?;
    }
    // Bob's own region waits for the conversation to arrive before he writes to it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while bob.get(&format!("/v1/conversations/{cid}")).await?.0 != 200 {
        if tokio::time::Instant::now() > deadline {
            bail!("eu never saw {cid}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for i in 0..6 {
        bob.send(&cid, &format!("b{i}"), &format!("预算 budget reply {i}"))
            .await?;
    }
    regions.wait_converged().await?;
    // Ann reads us's index, bob eu's; both are members of the one conversation, so both
    // must be shown the same messages, in the same order, with the same cursors.
    for (q, expected) in [("budget", 12), ("预算", 12), ("draft 预算", 6), ("reply", 6)] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (s1, us) = search(&ann, q, "&limit=100").await?;
            let (s2, eu) = search(&bob, q, "&limit=100").await?;
            let n = us["messages"].as_array().map_or(0, Vec::len);
            if s1 == 200 && us == eu && n == expected {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{q:?}: us {s1} {us}\neu {s2} {eu}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    regions.stop().await
}

/// The Rust SDK's search: typed hits, filters, paging with the cursor, typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_the_sdk_searches_and_pages() -> Result<()> {
    use meridian_client::{Client, ClientError, SearchRequest};
    let r = TestRegion::start().await?;
    let ann_s = r.user("ann", "laptop").await?;
    let bob_s = r.user("bob", "phone").await?;
    let ann = Client::new(&r.base, &ann_s.token);
    let bob = Client::new(&r.base, &bob_s.token);
    let conv = ann.create_direct("bob").await?;
    for i in 0..5 {
        ann.send(
            &conv.conversation_id,
            &format!("c{i}"),
            "text",
            &json!({"text": format!("Ünïcode & spaces {i}")}),
        )
        .await?;
    }
    caught_up(&r).await?;
    let mut req = SearchRequest {
        limit: Some(2),
        conversation_id: Some(conv.conversation_id.clone()),
        sender: Some("ann".into()),
        ..SearchRequest::new("unicode &")
    };
    let mut texts = Vec::new();
    for _ in 0..10 {
        let page = bob.search(&req).await?;
        for hit in &page.items {
            assert_eq!(hit.conversation_id, conv.conversation_id);
            assert_eq!(hit.highlights[0].ranges[0], [0, 7], "{hit:?}");
            texts.push(
                hit.message
                    .body
                    .as_ref()
                    .and_then(|b| b["text"].as_str())
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        match page.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => break,
        }
    }
    let want: Vec<String> = (0..5).rev().map(|i| format!("Ünïcode & spaces {i}")).collect();
    assert_eq!(texts, want);
    match bob.search(&SearchRequest::new("")).await {
        Err(ClientError::Api {
            status: 400, code, ..
        }) => assert_eq!(code, "invalid_argument"),
        other => panic!("expected 400, got {other:?}"),
    }
    r.stop().await
}
