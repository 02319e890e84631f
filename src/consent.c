/*
 * consent.c: whether a closing trade's user opted in, and which adapters
 * its signal lists, read straight from the indexes of the application's
 * users and signals tables.
 *
 * The enqueue statement (trigger.c) asks the same two questions in SQL:
 *     EXISTS (SELECT 1 FROM users u WHERE u.user_id = $2 AND u.tracing_enabled)
 *     EXISTS (SELECT 1 FROM signals s WHERE s.signal_id = $3
 *                                      AND a.name = ANY (s.tracing_adapters))
 * Starting an executor for them cost more than reading the two rows.  This
 * file answers them with one btree index scan each, under the snapshot the
 * statement would have used, and only where the answer cannot differ from
 * the statement's: a plain table without row-level security that the
 * current user may read, a valid btree index without predicate whose first
 * column is the key, under the type's default operator class, with an
 * equality operator for the key's type and a deterministic collation; a
 * boolean tracing_enabled; a text or varchar array tracing_adapters in the
 * default collation.  Anything else answers "ask SQL" (-1 from
 * trace_consent_read), and the caller runs the statement.
 *
 * What was found out about a table (its columns, the index, the operator)
 * is kept for the session and forgotten when the relcache reports a change
 * to the table or the index; it is only trusted after the table is locked,
 * which is when such reports are read.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/pg_am.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "commands/defrem.h"
#include "executor/tuptable.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "src/trace_ext.h"

/* How to find a table's rows by key: one per (table, key type). */
typedef struct KeyLookup
{
	Oid			relid;
	Oid			argtype;		/* the key value's type (base type) */
	bool		usable;			/* false: ask SQL */
	AttrNumber	valattno;		/* tracing_enabled or tracing_adapters */
	Oid			indexid;
	Oid			subtype;		/* right-hand type of the equality operator */
	Oid			collation;		/* the index column's */
	RegProcedure eqproc;
} KeyLookup;

#define MAX_LOOKUPS 8
static KeyLookup lookups[MAX_LOOKUPS];
static int	nlookups = 0;
static bool lookups_stale = false;
static bool building = false;
static bool callback_registered = false;

/*
 * A relcache report about a table or index we rely on: forget them all.
 * So does any report while a lookup is being found out (what it read may
 * already be old).
 */
static void
consent_relcache_callback(Datum arg, Oid relid)
{
	if (building)
		lookups_stale = true;
	for (int i = 0; i < nlookups; i++)
		if (!OidIsValid(relid) || lookups[i].relid == relid ||
			lookups[i].indexid == relid)
			lookups_stale = true;
}

static bool
key_type_ok(Oid type)
{
	switch (type)
	{
		case INT2OID:
		case INT4OID:
		case INT8OID:
		case TEXTOID:
		case VARCHAROID:
		case UUIDOID:
			return true;
		default:
			return false;
	}
}

/* The operator class of the index's first column. */
static Oid
first_opclass(Relation index)
{
	bool		isnull;
	Datum		d = SysCacheGetAttr(INDEXRELID, index->rd_indextuple,
									Anum_pg_index_indclass, &isnull);

	return isnull ? InvalidOid : ((oidvector *) DatumGetPointer(d))->values[0];
}

/*
 * Is this index one to find rows by keyattno = (value of argtype) with,
 * as the statement's "=" would?  Fills eqproc, subtype and collation.
 */
static bool
index_fits(Relation heap, Relation index, AttrNumber keyattno, Oid argtype,
		   KeyLookup *k)
{
	Form_pg_index form = index->rd_index;
	Form_pg_attribute keyatt = TupleDescAttr(RelationGetDescr(heap), keyattno - 1);
	Oid			family;
	Oid			opcintype;
	Oid			op;

	if (index->rd_rel->relam != BTREE_AM_OID || !form->indisvalid ||
		!form->indisready || !form->indislive ||
		form->indkey.values[0] != keyattno ||
		!heap_attisnull(index->rd_indextuple, Anum_pg_index_indpred, NULL) ||
		!heap_attisnull(index->rd_indextuple, Anum_pg_index_indexprs, NULL))
		return false;

	opcintype = index->rd_opcintype[0];
	family = index->rd_opfamily[0];
	if (index->rd_indcollation[0] != keyatt->attcollation)
		return false;
	if (OidIsValid(keyatt->attcollation) &&
		!get_collation_isdeterministic(keyatt->attcollation))
		return false;
	if (GetDefaultOpClass(getBaseType(keyatt->atttypid), BTREE_AM_OID) !=
		first_opclass(index))
		return false;
	op = get_opfamily_member(family, opcintype, argtype, BTEqualStrategyNumber);
	if (!OidIsValid(op))
		return false;
	k->eqproc = get_opcode(op);
	k->subtype = argtype;
	k->collation = index->rd_indcollation[0];
	k->indexid = RelationGetRelid(index);
	return true;
}

/* Find out how to look rows of heap up by column keyname. */
static void
build_lookup(Relation heap, const char *keyname, const char *valname,
			 Oid valtype, KeyLookup *k)
{
	TupleDesc	desc = RelationGetDescr(heap);
	AttrNumber	keyattno = get_attnum(RelationGetRelid(heap), keyname);
	List	   *indexes;
	ListCell   *lc;

	k->usable = false;
	k->valattno = get_attnum(RelationGetRelid(heap), valname);
	if (keyattno <= 0 || k->valattno <= 0 || !key_type_ok(k->argtype) ||
		!key_type_ok(getBaseType(TupleDescAttr(desc, keyattno - 1)->atttypid)))
		return;
	if (valtype == BOOLOID)
	{
		if (getBaseType(TupleDescAttr(desc, k->valattno - 1)->atttypid) != BOOLOID)
			return;
	}
	else
	{
		Form_pg_attribute att = TupleDescAttr(desc, k->valattno - 1);
		Oid			elem = get_element_type(getBaseType(att->atttypid));

		if ((elem != TEXTOID && elem != VARCHAROID) ||
			att->attcollation != DEFAULT_COLLATION_OID)
			return;
	}

	indexes = RelationGetIndexList(heap);
	foreach(lc, indexes)
	{
		Relation	index = index_open(lfirst_oid(lc), AccessShareLock);
		bool		fits = index_fits(heap, index, keyattno, k->argtype, k);

		index_close(index, NoLock);
		if (fits)
		{
			k->usable = true;
			break;
		}
	}
	list_free(indexes);
}

/*
 * The lookup for (heap, key type), found out the first time.  The table
 * is locked: a change to it or its index reported since the last call has
 * been read (and made the kept lookups stale).
 */
static KeyLookup *
get_lookup(Relation heap, Oid argtype, const char *keyname,
		   const char *valname, Oid valtype)
{
	KeyLookup  *k;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(consent_relcache_callback, (Datum) 0);
		callback_registered = true;
	}
	building = false;			/* after an error in build_lookup */
	if (lookups_stale)
	{
		nlookups = 0;
		lookups_stale = false;
	}
	for (int i = 0; i < nlookups; i++)
		if (lookups[i].relid == RelationGetRelid(heap) &&
			lookups[i].argtype == argtype)
			return &lookups[i];

	if (nlookups == MAX_LOOKUPS)
	{
		memmove(&lookups[0], &lookups[1], sizeof(KeyLookup) * (MAX_LOOKUPS - 1));
		nlookups--;
	}
	k = &lookups[nlookups];
	memset(k, 0, sizeof(KeyLookup));
	k->relid = RelationGetRelid(heap);
	k->argtype = argtype;
	building = true;
	build_lookup(heap, keyname, valname, valtype, k);
	building = false;
	nlookups++;
	return k;
}

/* May this table be read directly, as the statement would read it? */
static bool
table_readable(Relation heap)
{
	return heap->rd_rel->relkind == RELKIND_RELATION &&
		!heap->rd_rel->relrowsecurity &&
		pg_class_aclcheck(RelationGetRelid(heap), GetUserId(), ACL_SELECT) == ACLCHECK_OK;
}

typedef void (*RowVisitor) (TupleTableSlot *slot, AttrNumber valattno, void *arg);

/* Visit the rows of heap whose key equals key, under snapshot. */
static void
scan_key(Relation heap, const KeyLookup *k, Datum key, Snapshot snapshot,
		 RowVisitor visit, void *arg)
{
	Relation	index = index_open(k->indexid, AccessShareLock);
	TupleTableSlot *slot = table_slot_create(heap, NULL);
	IndexScanDesc scan;
	ScanKeyData skey;

	ScanKeyEntryInitialize(&skey, 0, 1, BTEqualStrategyNumber, k->subtype,
						   k->collation, k->eqproc, key);
	scan = index_beginscan(heap, index, snapshot, 1, 0);
	index_rescan(scan, &skey, 1, NULL, 0);
	while (index_getnext_slot(scan, ForwardScanDirection, slot))
		visit(slot, k->valattno, arg);
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(index, NoLock);
}

static void
visit_user(TupleTableSlot *slot, AttrNumber valattno, void *arg)
{
	bool		isnull;
	Datum		enabled = slot_getattr(slot, valattno, &isnull);

	if (!isnull && DatumGetBool(enabled))
		*(bool *) arg = true;
}

/* Marks in arg (bool[TRACE_MAX_ADAPTERS]) the adapters the row lists. */
static void
visit_signal(TupleTableSlot *slot, AttrNumber valattno, void *arg)
{
	bool	   *listed = (bool *) arg;
	bool		isnull;
	Datum		value = slot_getattr(slot, valattno, &isnull);
	ArrayType  *array;
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	if (isnull)
		return;
	array = DatumGetArrayTypeP(value);
	deconstruct_array(array, ARR_ELEMTYPE(array), -1, false, TYPALIGN_INT,
					  &elems, &nulls, &n);
	for (int i = 0; i < n; i++)
	{
		text	   *name;
		int			kind;

		if (nulls[i])
			continue;
		name = DatumGetTextPP(elems[i]);
		kind = trace_adapter_id_n(VARDATA_ANY(name), VARSIZE_ANY_EXHDR(name));
		if (kind >= 0)
			listed[kind] = true;
	}
}

/*
 * How to read the consent of a trade from these tables (copied: the kept
 * lookups may be rebuilt while we scan); false if the statement must.
 */
static bool
usable_lookup(Relation heap, Oid type, const char *keyname, const char *valname,
			  Oid valtype, KeyLookup *result)
{
	if (!table_readable(heap))
		return false;
	*result = *get_lookup(heap, getBaseType(type), keyname, valname, valtype);
	return result->usable;
}

/*
 * The consent of a trade: whether its user opted in (a users row with
 * tracing_enabled true) and, unless signals is NULL (the operator's own
 * choice of adapters), which adapters its signal lists.  users and signals
 * are the tables beside the trades table, locked by the caller.  Returns
 * -1 when this file cannot read them as the statement would (the caller
 * then runs the statement); 0 when the user has not opted in; 1 when they
 * have, with listed[] the signal's adapters (all, without signals).
 */
int
trace_consent_read(Relation users, Datum user_id, Oid user_type,
				   Relation signals, Datum signal_id, Oid signal_type,
				   bool signal_null, Snapshot snapshot, bool *listed)
{
	KeyLookup	user_lookup;
	KeyLookup	signal_lookup;
	bool		enabled = false;

	if (!usable_lookup(users, user_type, "user_id", "tracing_enabled", BOOLOID,
					   &user_lookup))
		return -1;
	if (signals != NULL &&
		!usable_lookup(signals, signal_type, "signal_id", "tracing_adapters",
					   TEXTARRAYOID, &signal_lookup))
		return -1;

	scan_key(users, &user_lookup, user_id, snapshot, visit_user, &enabled);
	if (!enabled)
		return 0;
	memset(listed, signals == NULL, sizeof(bool) * TRACE_MAX_ADAPTERS);
	if (signals != NULL && !signal_null)
		scan_key(signals, &signal_lookup, signal_id, snapshot, visit_signal, listed);
	return 1;
}
