"""The Streamlit app over the run registry: `streamlit run streamlit_app/app.py` (see the README's app section)."""
