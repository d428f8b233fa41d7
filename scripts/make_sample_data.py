"""Regenerate every sample input in data/ (deterministic), then the tiny tokenizer trained on them.

    python scripts/make_sample_data.py

Each source has its own generator beside this file, in the source format its builder reads (finetune/data/).
"""
import make_tiny_tokenizer
import sample_decisions
import sample_demo_signals
import sample_news
import sample_sentiment
import sample_style
import sample_trades

if __name__ == "__main__":
    for generator in (sample_trades, sample_demo_signals, sample_decisions, sample_news, sample_sentiment,
                      sample_style):
        generator.main()
    make_tiny_tokenizer.main()
