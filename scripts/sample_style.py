"""Write data/essays/<slug>/index.md + meta.json: the writing-style corpus of one author's posts, 12 short essays.

Deterministic (seeded random.Random). Eight essays are English, four Chinese. The author's style is
easy to measure: very short sentences, a recurring "Here is the thing:" (说到底，), em dashes (——),
and paragraphs that often end on "That is the point." (就这样。). The Markdown carries the noise the
builder must strip: YAML front matter, headings, images, links, inline code, fenced code blocks, HTML
tags and a table, so cleaning is exercised on the sample data too.

    python scripts/sample_style.py
"""
import json
import random
import shutil
from datetime import date, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "essays"

TOPICS_EN = {
    "slow mornings": ["I walk early.", "The street is empty.", "The bakery lights come on first.",
                      "A dog barks twice.", "My coffee goes cold in my hand.", "I do not bring my phone.",
                      "The air smells of wet stone.", "A bus passes with nobody on it.",
                      "I count the windows that are lit.", "My feet know the way.", "The sky turns grey, then pale.",
                      "A man sweeps his shop front.", "I nod. He nods back.", "Birds start before the traffic.",
                      "By seven the city is loud again.", "I keep the quiet hour for myself."],
    "writing every day": ["I write one page a day.", "Some pages are bad.", "Most pages are bad.",
                          "I keep them anyway.", "The habit matters more than the page.",
                          "I write before I read the news.", "A timer helps.", "Twenty minutes is enough.",
                          "I never fix a sentence on the same day.", "The next morning it looks different.",
                          "Short sentences hide nothing.", "Long ones hide a lot.", "I cut adjectives first.",
                          "Then I cut the clever parts.", "What is left is usually true.", "I stop mid-sentence."],
    "small tools": ["I like small tools.", "A tool should do one thing.", "My notes live in plain text.",
                    "Plain text outlives every app.", "I wrote a script for my journal.", "It is ten lines long.",
                    "It has never broken.", "Big tools want your attention.", "Small tools give it back.",
                    "I delete plugins I do not use.", "Every setting is a decision.", "Fewer decisions, better days.",
                    "My editor opens in a second.", "That second matters.", "I learned this the slow way.",
                    "Nobody needs a dashboard for a grocery list."],
    "reading slowly": ["I read slowly now.", "One chapter a night.", "I used to race through books.",
                       "I remembered nothing.", "Now I underline.", "I write one line in the margin.",
                       "Sometimes I read a page twice.", "Good books reward it.", "Bad books do not survive it.",
                       "I keep a list of sentences I stole.", "Stolen is the right word.", "I quit books more often.",
                       "Quitting is allowed.", "Life is short. Shelves are long.", "A slow book lasts a month.",
                       "I am fine with that."],
    "coffee": ["I make coffee by hand.", "It takes four minutes.", "I grind the beans first.",
               "The kettle ticks as it cools.", "Water at ninety-four degrees.", "I pour in three circles.",
               "The bloom rises and falls.", "I do not check my phone while it drips.", "Four minutes of nothing.",
               "That is rare now.", "The coffee is fine.", "Not great. Fine.", "The ritual is the point.",
               "I tried a machine once.", "It was faster.", "I missed the four minutes."],
    "trains": ["I take the slow train.", "It stops everywhere.", "Nobody is in a hurry on it.",
               "An old woman knits.", "A boy counts cows.", "The conductor knows everyone.",
               "I watch the fields go past.", "Rivers, then towns, then rivers.", "The fast train saves an hour.",
               "I do not need the hour.", "I need the window.", "I read a little.", "I sleep a little.",
               "I arrive rested.", "That never happens by plane.", "The ticket costs less, too."],
    "notebooks": ["I carry a notebook.", "A cheap one.", "Expensive notebooks scare me.",
                  "I write badly in them.", "Lists, mostly.", "Sometimes a sentence I overheard.",
                  "Sometimes a sketch of a chair.", "I fill one every two months.", "I never reread them.",
                  "Well, almost never.", "Writing it down is the point.", "The hand remembers.",
                  "The screen forgets.", "I number the pages.", "I date every entry.",
                  "Old notebooks live in a shoebox."],
    "rain": ["It rained all week.", "I did not mind.", "Rain makes the city smaller.", "People walk faster.",
             "Cafes fill up.", "Windows fog over.", "I like the sound on the roof.", "It sounds like static.",
             "Good static.", "I stayed in and wrote.", "The pages came easily.", "Maybe rain helps.",
             "Maybe I just had nowhere to go.", "On Friday the sun came back.", "I felt almost sorry.",
             "The street dried in an hour."],
}
TOPICS_ZH = {
    "早晨散步": ["我喜欢早起。", "街上没人。", "面包店先亮灯。", "空气有点凉。", "我不带手机。", "狗叫了两声。",
             "我数着亮灯的窗户。", "扫地的大爷冲我点头。", "我也点头。", "鸟比车先醒。", "天慢慢亮了。",
             "七点以后，城市又吵起来。", "这一个小时是我的。", "脚自己认得路。"],
    "每天写一点": ["我每天写一页。", "大多数写得不好。", "我还是留着。", "习惯比文字重要。", "我先写，再看新闻。",
              "二十分钟就够。", "当天不改句子。", "第二天再看，就不一样了。", "短句藏不住东西。",
              "长句藏得太多。", "我先删形容词。", "再删自作聪明的地方。", "剩下的，多半是真话。"],
    "慢慢读书": ["我现在读得很慢。", "一晚一章。", "以前我读得飞快。", "读完什么都不记得。", "现在我会划线。",
             "有时一页读两遍。", "好书经得起。", "坏书经不起。", "我也常常弃书。", "弃书是允许的。",
             "人生很短，书架很长。", "一本慢书能读一个月。", "我觉得挺好。"],
    "下雨天": ["下了一整周的雨。", "我不介意。", "雨让城市变小了。", "人走得更快。", "咖啡馆坐满了。",
            "窗户起了雾。", "我喜欢雨打屋顶的声音。", "像收音机的杂音。", "好听的杂音。", "我待在家里写东西。",
            "写得很顺。", "也许是雨的功劳。", "也许只是我无处可去。", "周五太阳回来了。", "我竟有点舍不得。"],
}
SLUGS_ZH = {"早晨散步": "morning-walk-zh", "每天写一点": "daily-writing-zh", "慢慢读书": "slow-reading-zh",
            "下雨天": "rainy-days-zh"}
GENERIC_EN = ["Nobody tells you this.", "It is small. It matters.", "I tried. It failed. I tried again.",
              "Simple is not easy.", "Most days are ordinary.", "Ordinary is good.", "I am not sure why.",
              "It works for me.", "Your mileage may vary.", "Keep it short."]
GENERIC_ZH = ["没人告诉你这些。", "事情很小，但重要。", "试了，失败了，再试。", "简单不等于容易。", "大多数日子都很平常。",
              "平常就很好。", "我也说不清为什么。", "对我有用。"]
CODE = {"small tools": "```python\nfor line in open('journal.txt'):\n    print(line.strip())\n```",
        "writing every day": "```bash\ntimer 20m && vim today.md\n```",
        "notebooks": "~~~\n2024-03-02  chair, blue, three legs\n~~~"}


def lower_first(sentence):
    return sentence if sentence.split()[0] in ("I", "I'm") else sentence[0].lower() + sentence[1:]


def paragraph(rng, bank, generic, zh):
    picks = [bank.pop(0) for _ in range(min(len(bank), rng.randint(2, 3)))]
    picks.insert(rng.randint(0, len(picks)), rng.choice(generic))
    if rng.random() < 0.4:  # the recurring phrase, before one of the author's sentences
        i = rng.randrange(len(picks))
        picks[i] = ("说到底，" + picks[i]) if zh else ("Here is the thing: " + lower_first(picks[i]))
    if rng.random() < 0.3 and len(picks) > 1:  # the em dash, joining two sentences
        picks[-2:] = [picks[-2].rstrip("。.") + ("——" if zh else " — ") + lower_first(picks[-1])]
    if rng.random() < 0.5:
        picks.append("就这样。" if zh else "That is the point.")
    return ("" if zh else " ").join(picks)


def essay(rng, title, bank, zh, slug):
    bank = bank[:]
    rng.shuffle(bank)
    bank = bank * 3  # a sentence can come back, as the author's refrains do
    generic = GENERIC_ZH if zh else GENERIC_EN
    paragraphs = [paragraph(rng, bank, generic, zh) for _ in range(rng.randint(11, 14))]
    # the Markdown noise a real post has, put between and inside paragraphs
    first = paragraphs[1].split("。" if zh else ". ")[0]
    paragraphs[1] = paragraphs[1].replace(first, f"[{first}](https://example.com/{slug})", 1)
    paragraphs.insert(2, f"![{title}](images/{slug}-1.jpg)")
    if title in CODE:
        paragraphs.insert(4, CODE[title])
        paragraphs[5] = paragraphs[5] + (" 命令是 `vim`。" if zh else " I run `journal.py` for that.")
    if rng.random() < 0.5:
        paragraphs.insert(3, "<p align=\"center\"><em>" + ("——雨天记" if zh else "— notes from the week") + "</em></p>")
    if slug.endswith("trains"):
        paragraphs.insert(5, "| line | minutes |\n|---|---|\n| slow | 95 |\n| fast | 40 |")
    heading = f"## {'再说两句' if zh else 'One more thing'}"
    paragraphs.insert(len(paragraphs) - 2, heading)
    return f"# {title.capitalize() if not zh else title}\n\n" + "\n\n".join(paragraphs) + "\n"


def main():
    rng = random.Random(3)
    shutil.rmtree(OUT, ignore_errors=True)
    topics = [(t, b, False) for t, b in TOPICS_EN.items()] + [(t, b, True) for t, b in TOPICS_ZH.items()]
    rng.shuffle(topics)
    day = date(2023, 1, 8)
    for i, (title, bank, zh) in enumerate(topics):
        day += timedelta(days=rng.randint(25, 45))
        slug = f"{day:%Y-%m}-" + (SLUGS_ZH[title] if zh else title.replace(" ", "-"))
        folder = OUT / slug
        folder.mkdir(parents=True)
        body = essay(rng, title, bank, zh, slug)
        if i % 3 == 0:  # some exports keep a front matter block as well as meta.json
            body = f"---\ntitle: \"{title}\"\ndate: {day.isoformat()}\nlayout: post\n---\n" + body
        (folder / "index.md").write_text(body, encoding="utf-8")
        meta = {"title": title if zh else title.capitalize(), "date": day.isoformat(),
                "tags": ["生活"] if zh else ["life", "habits"], "author": "M.", "lang": "zh" if zh else "en",
                "url": f"https://example.com/{slug}"}
        (folder / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(topics)} essays to {OUT}")


if __name__ == "__main__":
    main()
